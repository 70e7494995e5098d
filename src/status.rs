//! `loralab status RUN_DIR`: every cell of a run folder, finished, running, failed or not
//! started, with totals. Reads the folder only; it is safe while workers run.

use std::path::Path;

use crate::cells::{self, State};

/// The tally of a run folder's cells.
#[derive(Debug, Default, PartialEq)]
pub struct Totals {
    pub finished: usize,
    pub running: usize,
    pub failed: usize,
    pub not_started: usize,
}

impl Totals {
    pub fn cells(&self) -> usize {
        self.finished + self.running + self.failed + self.not_started
    }
}

/// Prints the status of `dir` and returns the totals.
pub fn print(dir: &Path) -> anyhow::Result<Totals> {
    anyhow::ensure!(dir.is_dir(), "{} is not a run folder (no such folder)", dir.display());
    if let Ok(text) = std::fs::read_to_string(dir.join("run.json")) {
        if let Ok(run) = serde_json::from_str::<serde_json::Value>(&text) {
            println!("run {}: script {}", dir.display(), run["script"].as_str().unwrap_or("?"));
        }
    }
    let ttl = cells::lease_ttl();
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.join(cells::KEY).exists())
        .collect();
    names.sort();
    let mut totals = Totals::default();
    for cell in &names {
        let name = cells::cell_name(cell);
        let line = match cells::state(cell, ttl)? {
            State::Finished => {
                totals.finished += 1;
                format!("finished     {name}{}", finished_detail(cell))
            }
            State::Running(h) => {
                totals.running += 1;
                format!("running      {name}  {}, heartbeat {:.0} s ago", h.describe(), h.age())
            }
            State::Stale(h) => {
                totals.not_started += 1;
                format!(
                    "interrupted  {name}  by {} (heartbeat {:.0} s ago); the next worker resumes it",
                    h.describe(),
                    h.age()
                )
            }
            State::Failed(f) => {
                totals.failed += 1;
                format!("failed       {name}  {}", f.error.lines().next().unwrap_or(""))
            }
            State::NotStarted => {
                totals.not_started += 1;
                match cells::read_claims(cell).len() {
                    0 => format!("not started  {name}"),
                    n => format!("interrupted  {name}  (started {n} time(s)); the next worker resumes it"),
                }
            }
        };
        println!("{line}");
    }
    for job in crate::slurm::submissions(dir) {
        let live = crate::slurm::live_tasks(&job.job);
        println!("slurm job {}: {} task(s) submitted, {} queued or running", job.job, job.tasks, live.len());
    }
    println!(
        "{} finished, {} running, {} failed, {} not started ({} cells)",
        totals.finished,
        totals.running,
        totals.failed,
        totals.not_started,
        totals.cells()
    );
    Ok(totals)
}

/// " (12 s, w0 on host)" from a finished cell's meta.json.
fn finished_detail(cell: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(cell.join("meta.json")) else { return String::new() };
    let Ok(meta) = serde_json::from_str::<serde_json::Value>(&text) else { return String::new() };
    let mut parts = Vec::new();
    if let Some(s) = meta["seconds"].as_f64() {
        parts.push(format!("{s:.0} s"));
    }
    let who = match (meta["worker"].as_str(), meta["host"].as_str()) {
        (Some(w), Some(h)) => Some(format!("{w} on {h}")),
        (None, Some(h)) => Some(h.to_string()),
        _ => None,
    };
    parts.extend(who);
    if parts.is_empty() {
        String::new()
    } else {
        format!("  ({})", parts.join(", "))
    }
}
