//! `loralab slurm SCRIPT --tasks N ...`: the script as a Slurm array whose tasks are workers.
//!
//! Slurm is the scheduler; loralab only writes a readable sbatch script into the run folder
//! (`slurm/array-K.sbatch`, resubmittable by hand), submits it with `sbatch --parsable` and
//! records the job in `slurm/jobs.json`. Each array task runs `loralab run SCRIPT --worker ...`
//! on the run folder, which coordinates them as it does local workers. Tasks are submitted with
//! `--requeue` and `--signal=B:USR2@120`: a worker warned or stopped by a signal releases its
//! cell at the next step boundary, so a requeued or resubmitted task resumes it. Running the
//! command again submits only the tasks that are missing (neither queued nor running).

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::store::{key_hash, write_atomic};

/// The options of `loralab slurm`.
#[derive(Clone, Debug, Default)]
pub struct SlurmOptions {
    pub tasks: usize,
    pub gpus_per_task: Option<usize>,
    pub cpus_per_task: Option<usize>,
    pub partition: Option<String>,
    pub time: Option<String>,
    pub account: Option<String>,
    /// Further `#SBATCH` lines, as given (`--mem=32G`, `--qos=high`).
    pub sbatch_args: Vec<String>,
}

/// One submission, as `slurm/jobs.json` lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Submission {
    pub job: String,
    pub tasks: usize,
    pub launch: String,
    pub script: String,
    pub submitted_at: f64,
}

/// Task states in which a task will still run (or runs now).
const LIVE_STATES: &[&str] = &[
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
];

fn have_sbatch() -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("sbatch").is_file()))
        .unwrap_or(false);
    anyhow::ensure!(
        found,
        "the Slurm client is not installed: no sbatch on the PATH. Install it (Debian: apt-get install \
         slurm-client) or load your cluster's Slurm module, then run this command again"
    );
    Ok(())
}

/// Plans, writes and submits the array (or says why nothing needs submitting).
pub fn submit(script: &Path, settings: &[(String, String)], opts: &SlurmOptions) -> anyhow::Result<()> {
    anyhow::ensure!(opts.tasks >= 1, "--tasks {}: at least one task", opts.tasks);
    have_sbatch()?;
    let plan = crate::lua::plan_file(script, &settings.to_vec())?;
    let cwd = std::env::current_dir()?;
    let dir = if plan.dir.is_absolute() { plan.dir.clone() } else { cwd.join(&plan.dir) };
    if is_complete(&dir, script, &plan.settings) {
        println!(
            "nothing to submit: every cell of {} is finished (see complete.json; `loralab status {}`)",
            dir.display(),
            dir.display()
        );
        return Ok(());
    }
    let jobs_path = dir.join("slurm/jobs.json");
    let mut jobs: Vec<Submission> = match std::fs::read_to_string(&jobs_path) {
        Ok(t) => serde_json::from_str(&t).with_context(|| format!("{} is not valid JSON", jobs_path.display()))?,
        Err(_) => Vec::new(),
    };
    let live: Vec<(String, String)> = jobs.iter().flat_map(|j| live_tasks(&j.job)).collect();
    if live.len() >= opts.tasks {
        let ids: Vec<&str> = live.iter().map(|(id, _)| id.as_str()).collect();
        println!(
            "nothing to submit: {} task(s) are queued or running already ({}); follow them with `loralab status {}`",
            live.len(),
            ids.join(", "),
            dir.display()
        );
        return Ok(());
    }
    let missing = opts.tasks - live.len();
    // Tasks joining live ones belong to their launch: a cell that failed there stays failed.
    let launch = match (live.is_empty(), jobs.last()) {
        (false, Some(j)) => j.launch.clone(),
        _ => format!("slurm-{}-{}", crate::cells::hostname(), crate::cells::now_unix() as u64),
    };
    let exe = std::env::current_exe().context("cannot find the loralab binary")?;
    let text = sbatch_script(&exe, &cwd, script, settings, &dir, missing, &launch, opts);
    let file = dir.join(format!("slurm/array-{}.sbatch", jobs.len() + 1));
    write_atomic(&file, text.as_bytes()).with_context(|| format!("cannot write {}", file.display()))?;
    let out = Command::new("sbatch").arg("--parsable").arg(&file).output().context("cannot run sbatch")?;
    anyhow::ensure!(
        out.status.success(),
        "sbatch refused {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // --parsable prints "JOBID" or "JOBID;CLUSTER".
    let job = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or("").to_string();
    anyhow::ensure!(!job.is_empty(), "sbatch printed no job id for {}", file.display());
    jobs.push(Submission {
        job: job.clone(),
        tasks: missing,
        launch,
        script: file.display().to_string(),
        submitted_at: crate::cells::now_unix(),
    });
    let text = serde_json::to_string_pretty(&jobs)? + "\n";
    write_atomic(&jobs_path, text.as_bytes()).with_context(|| format!("cannot write {}", jobs_path.display()))?;
    if !live.is_empty() {
        println!("{} task(s) are queued or running already; submitting the {missing} missing", live.len());
    }
    println!("submitted array job {job} ({missing} task(s)) from {}", file.display());
    println!("follow it:   squeue -j {job}    loralab status {}", dir.display());
    println!("its output:  {}/slurm/{job}_*.out", dir.display());
    Ok(())
}

/// Whether a worker finished this script with these settings on `dir` with every cell finished.
fn is_complete(dir: &Path, script: &Path, settings: &serde_json::Value) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("complete.json")) else { return false };
    let Ok(done) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    done["settings_hash"].as_str() == Some(key_hash(settings).as_str())
        && done["script"].as_str() == Some(script.display().to_string().as_str())
}

/// The tasks of `job` that are queued or running: (task id, state).
pub fn live_tasks(job: &str) -> Vec<(String, String)> {
    // -r lists each array task on its own line; a job Slurm has forgotten is an error: none live.
    let Ok(out) = Command::new("squeue").args(["-h", "-r", "-j", job, "-o", "%i %T"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (id, state) = l.trim().split_once(' ')?;
            LIVE_STATES.contains(&state.trim()).then(|| (id.to_string(), state.trim().to_string()))
        })
        .collect()
}

/// Quotes a word for the shell (single quotes, `'` written as `'\''`).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The sbatch script: an array of `tasks` workers of `script` on the run folder `dir`.
#[allow(clippy::too_many_arguments)]
pub fn sbatch_script(
    exe: &Path,
    cwd: &Path,
    script: &Path,
    settings: &[(String, String)],
    dir: &Path,
    tasks: usize,
    launch: &str,
    opts: &SlurmOptions,
) -> String {
    let stem = script.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "script".into());
    let mut lines = vec![
        "#!/bin/bash".to_string(),
        format!("# {tasks} loralab worker(s) of {} on the run folder {}.", script.display(), dir.display()),
        "# Written by `loralab slurm`; resubmit by hand with `sbatch` on this file.".to_string(),
        format!("#SBATCH --job-name=loralab-{stem}"),
        format!("#SBATCH --array=0-{}", tasks - 1),
        format!("#SBATCH --chdir={}", cwd.display()),
        format!("#SBATCH --output={}/slurm/%A_%a.out", dir.display()),
        "#SBATCH --open-mode=append".to_string(),
        "# A requeued task starts this script again and resumes the cell it was running.".to_string(),
        "#SBATCH --requeue".to_string(),
        "# USR2 two minutes before the time limit: the worker releases its cell at the next step.".to_string(),
        "#SBATCH --signal=B:USR2@120".to_string(),
    ];
    if let Some(g) = opts.gpus_per_task {
        lines.push(format!("#SBATCH --gres=gpu:{g}"));
    }
    if let Some(c) = opts.cpus_per_task {
        lines.push(format!("#SBATCH --cpus-per-task={c}"));
    }
    if let Some(p) = &opts.partition {
        lines.push(format!("#SBATCH --partition={p}"));
    }
    if let Some(t) = &opts.time {
        lines.push(format!("#SBATCH --time={t}"));
    }
    if let Some(a) = &opts.account {
        lines.push(format!("#SBATCH --account={a}"));
    }
    for a in &opts.sbatch_args {
        lines.push(format!("#SBATCH {a}"));
    }
    lines.push(String::new());
    lines.push(format!("export LORALAB_LAUNCH={}", shell_quote(launch)));
    let mut cmd =
        format!("exec {} run {}", shell_quote(&exe.display().to_string()), shell_quote(&script.display().to_string()));
    for (k, v) in settings {
        cmd.push_str(&format!(" --set {}", shell_quote(&format!("{k}={v}"))));
    }
    cmd.push_str(" --worker \"slurm-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}\"");
    lines.push("# exec: Slurm's signals reach the worker itself.".to_string());
    lines.push(cmd);
    lines.join("\n") + "\n"
}

/// The Slurm jobs recorded for a run folder.
pub fn submissions(dir: &Path) -> Vec<Submission> {
    std::fs::read_to_string(dir.join("slurm/jobs.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sbatch_script_is_an_array_of_workers_that_requeue_and_get_warned() {
        let opts = SlurmOptions {
            tasks: 4,
            gpus_per_task: Some(1),
            partition: Some("gpu".into()),
            time: Some("02:00:00".into()),
            sbatch_args: vec!["--mem=64G".into()],
            ..Default::default()
        };
        let s = sbatch_script(
            Path::new("/opt/loralab"),
            Path::new("/home/u/study"),
            Path::new("scripts/dose_response.lua"),
            &[("profile".into(), "paper".into()), ("note".into(), "it's".into())],
            Path::new("/home/u/study/runs/x"),
            4,
            "slurm-h-1",
            &opts,
        );
        for want in [
            "#SBATCH --array=0-3",
            "#SBATCH --requeue",
            "#SBATCH --signal=B:USR2@120",
            "#SBATCH --gres=gpu:1",
            "#SBATCH --partition=gpu",
            "#SBATCH --time=02:00:00",
            "#SBATCH --mem=64G",
            "#SBATCH --output=/home/u/study/runs/x/slurm/%A_%a.out",
            "export LORALAB_LAUNCH=slurm-h-1",
            "exec /opt/loralab run scripts/dose_response.lua --set profile=paper --set 'note=it'\\''s' --worker \"slurm-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}\"",
        ] {
            assert!(s.contains(want), "missing {want} in\n{s}");
        }
    }

    #[test]
    fn shell_quoting_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("lr=1e-4"), "lr=1e-4");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(shell_quote(""), "''");
    }
}
