//! One script in several workers sharing a run folder: local workers (`--workers`), killed and
//! stopped workers, signals, `loralab status`, and a real Slurm cluster (`loralab slurm`).
//!
//! The script is tests/scripts/scale_out.lua: one cell, a group of six, a summary. Every test
//! compares its cells' result.json with those of one sequential run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const SCRIPT: &str = "tests/scripts/scale_out.lua";

fn loralab() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_loralab"));
    c.current_dir(env!("CARGO_MANIFEST_DIR")).env_remove("LORALAB_LAUNCH").env_remove("LORALAB_LEASE_TTL");
    c
}

fn run_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["run".to_string(), SCRIPT.to_string(), "--set".into(), format!("out={}", out.display())];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Each finished cell's result.json, by cell folder name.
fn results(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("result.json").exists())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path().join("result.json")).unwrap(),
            )
        })
        .collect()
}

/// Claims (lines of claims.jsonl) per cell folder.
fn claims(dir: &Path) -> BTreeMap<String, Vec<serde_json::Value>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("key.json").exists())
        .map(|e| {
            let lines = std::fs::read_to_string(e.path().join("claims.jsonl")).unwrap_or_default();
            let v = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            (e.file_name().to_string_lossy().into_owned(), v)
        })
        .collect()
}

/// The results of one sequential run, made once for all tests.
fn reference() -> &'static BTreeMap<String, String> {
    static REF: OnceLock<(tempfile::TempDir, BTreeMap<String, String>)> = OnceLock::new();
    &REF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = loralab().args(run_args(dir.path(), &["--set", "pause=0"])).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let r = results(dir.path());
        assert_eq!(r.len(), 8, "first, six cells and the summary: {r:?}");
        (dir, r)
    })
    .1
}

fn wait_for<T>(what: &str, timeout_s: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + Duration::from_secs(timeout_s);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A lease of a group cell (dose*) in `dir` satisfying `pred`: (cell folder, lease).
fn group_lease(dir: &Path, pred: impl Fn(&serde_json::Value) -> bool) -> Option<(PathBuf, serde_json::Value)> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("dose") {
            return None;
        }
        let lease: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(e.path().join("lease.json")).ok()?).ok()?;
        pred(&lease).then_some((e.path(), lease))
    })
}

fn signal(pid: i64, sig: &str) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

fn spawn_quiet(args: Vec<String>, envs: &[(&str, &str)]) -> Child {
    let mut c = loralab();
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

#[test]
fn two_cpu_workers_give_the_same_results_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let out = loralab().args(run_args(dir.path(), &["--set", "pause=0.1", "--workers", "2"])).output().unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(&results(dir.path()), reference());
    // Both workers ran cells, printed with their prefix, and each saw the whole group.
    let workers: std::collections::BTreeSet<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("meta.json")).ok())
        .map(|m| serde_json::from_str::<serde_json::Value>(&m).unwrap()["worker"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(workers.into_iter().collect::<Vec<_>>(), ["w0", "w1"], "{log}");
    assert!(log.contains("[w0] finished 6 of 6") && log.contains("[w1] finished 6 of 6"), "{log}");
    // Which weights produced the results: in run.json and in each cell's meta.json.
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run.json")).unwrap()).unwrap();
    assert_eq!(run["models"][0]["source"], "random", "{run}");
    let weights = run["models"][0]["weights_id"].clone();
    for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
        if let Ok(m) = std::fs::read_to_string(e.path().join("meta.json")) {
            let meta: serde_json::Value = serde_json::from_str(&m).unwrap();
            assert_eq!(meta["models"][0]["weights_id"], weights, "{meta}");
        }
    }
    // The summary was written once: one claim of its cell.
    let c = claims(dir.path());
    let summary = c.iter().find(|(k, _)| k.starts_with("summary-")).unwrap().1;
    assert_eq!(summary.len(), 1);
}

#[test]
fn a_worker_killed_mid_cell_leaves_its_cell_to_the_other_which_finishes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let parent = spawn_quiet(run_args(dir.path(), &["--set", "pause=0.4", "--workers", "2"]), &[]);
    let (cell, lease) = wait_for("a worker to hold a group cell", 60, || group_lease(dir.path(), |_| true));
    signal(lease["pid"].as_i64().unwrap(), "-KILL");
    let out = parent.wait_with_output().unwrap();
    let log = text(&out);
    assert!(out.status.success(), "the other worker finished the run: {log}");
    assert!(log.contains("was killed by SIGKILL"), "{log}");
    assert_eq!(&results(dir.path()), reference());
    // The killed worker's cell was resumed by another process; no finished cell ran twice.
    let c = claims(dir.path());
    let killed = &c[&cell.file_name().unwrap().to_string_lossy().into_owned()];
    assert_eq!(killed.len(), 2, "{killed:?}");
    assert_eq!(killed[1]["resumed"], true);
    assert_eq!(c.values().filter(|v| v.len() > 1).count(), 1, "{c:?}");
}

#[test]
fn a_lease_whose_heartbeat_is_older_than_the_time_to_live_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let ttl = [("LORALAB_LEASE_TTL", "2")];
    let mut stuck = spawn_quiet(run_args(dir.path(), &["--set", "pause=0.4"]), &ttl);
    let (cell, lease) = wait_for("a group cell to be held", 60, || group_lease(dir.path(), |_| true));
    // Stopped, the holder keeps its lock but its heartbeat goes silent, like a hung host.
    let pid = lease["pid"].as_i64().unwrap();
    signal(pid, "-STOP");
    let mut other = loralab();
    other.args(run_args(dir.path(), &["--set", "pause=0.4"])).env("LORALAB_LEASE_TTL", "2");
    let out = other.output().unwrap();
    signal(pid, "-KILL");
    let _ = stuck.wait();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("taking it over from"), "{log}");
    assert_eq!(&results(dir.path()), reference());
    let c = claims(dir.path());
    assert_eq!(c[&cell.file_name().unwrap().to_string_lossy().into_owned()].len(), 2);
}

#[test]
fn a_stop_signal_releases_the_cell_says_where_and_a_rerun_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let child = spawn_quiet(run_args(dir.path(), &["--set", "pause=0.4"]), &[]);
    let (cell, _) = wait_for("a group cell to be held", 60, || group_lease(dir.path(), |_| true));
    signal(child.id() as i64, "-TERM");
    let out = child.wait_with_output().unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(143), "{log}");
    assert!(log.contains("stopped by SIGTERM during cell dose") && log.contains("rerun the same command"), "{log}");
    assert!(!cell.join("lease.json").exists(), "the lease was released");
    // Status: not every cell finished, so a non-zero exit.
    let st = loralab().args(["status", &dir.path().display().to_string()]).output().unwrap();
    assert!(!st.status.success() && text(&st).contains("interrupted"), "{}", text(&st));
    let out = loralab().args(run_args(dir.path(), &["--set", "pause=0.4"])).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(&results(dir.path()), reference());
    let st = loralab().args(["status", &dir.path().display().to_string()]).output().unwrap();
    assert!(
        st.status.success() && text(&st).contains("8 finished, 0 running, 0 failed, 0 not started"),
        "{}",
        text(&st)
    );
}

#[test]
fn other_settings_on_a_folder_in_use_are_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = spawn_quiet(run_args(dir.path(), &["--set", "pause=0.4"]), &[]);
    wait_for("the first run to hold a cell", 60, || group_lease(dir.path(), |_| true));
    let out = loralab().args(run_args(dir.path(), &["--set", "pause=0.4", "--set", "steps=5"])).output().unwrap();
    let _ = first.kill();
    let _ = first.wait();
    let log = text(&out);
    assert!(!out.status.success());
    assert!(
        log.contains("is in use by tests/scripts/scale_out.lua") && log.contains("steps: 4 there, 5 here"),
        "{log}"
    );
}

#[test]
fn a_cell_that_fails_fails_once_for_every_worker_and_the_exit_status_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = loralab()
        .args(run_args(dir.path(), &["--set", "pause=0", "--set", "fail=dose3", "--workers", "2"]))
        .output()
        .unwrap();
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("[w0] finished 5 of 6") && log.contains("[w1] finished 5 of 6"), "{log}");
    let c = claims(dir.path());
    let failed = c.iter().find(|(k, _)| k.starts_with("dose3-")).unwrap();
    assert_eq!(failed.1.len(), 1, "the other worker did not run the failed cell again");
    assert!(dir.path().join(failed.0).join("failed.json").exists());
}

#[test]
fn a_gpu_index_that_does_not_exist_is_an_error_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out =
        loralab().args(run_args(dir.path(), &["--gpus", "0,1"])).env("CUDA_VISIBLE_DEVICES", "3").output().unwrap();
    let log = text(&out);
    assert!(!out.status.success());
    assert!(log.contains("there is no GPU 1: CUDA_VISIBLE_DEVICES=3 makes 1 visible"), "{log}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing ran");
}

#[test]
fn slurm_without_its_client_says_it_is_not_installed() {
    let dir = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let out = loralab()
        .args(["slurm", SCRIPT, "--set", &format!("out={}", dir.path().display()), "--tasks", "2"])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("the Slurm client is not installed"), "{}", text(&out));
}

/// Whether a Slurm cluster answers here. In CI it must: `.ci/run` starts one.
fn slurm_is_up() -> bool {
    let up = Command::new("sinfo").args(["-h", "-o", "%t"]).output().is_ok_and(|o| {
        o.status.success() && ["idle", "mix", "alloc"].iter().any(|s| String::from_utf8_lossy(&o.stdout).contains(s))
    });
    if !up {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the Slurm test, but no Slurm cluster answers (sinfo); .ci/run starts one with tests/slurm/start.sh"
        );
        eprintln!(
            "skipped: no Slurm cluster answers here (sinfo); start one with `bash tests/slurm/start.sh` (as root)"
        );
    }
    up
}

fn live_tasks(job: &str) -> Vec<String> {
    let out = Command::new("squeue").args(["-h", "-r", "-j", job, "-o", "%i"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

fn submitted_job(out: &Output) -> String {
    let log = text(out);
    assert!(out.status.success(), "{log}");
    let line = log.lines().find(|l| l.starts_with("submitted array job ")).unwrap_or_else(|| panic!("{log}"));
    line["submitted array job ".len()..].split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_slurm_array_matches_a_sequential_run_and_resumes_after_a_task_is_cancelled() {
    if !slurm_is_up() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out_set = format!("out={}", dir.path().display());
    let submit =
        || loralab().args(["slurm", SCRIPT, "--set", &out_set, "--set", "pause=0.6", "--tasks", "2"]).output().unwrap();
    let first = submit();
    let job = submitted_job(&first);
    // Cancel task 1 while it runs a cell of the group.
    let task1 = format!("{job}_1");
    let (cell, _) = wait_for("task 1 to hold a group cell", 120, || {
        group_lease(dir.path(), |l| l["job"].as_str() == Some(task1.as_str()))
    });
    let st = loralab().args(["status", &dir.path().display().to_string()]).output().unwrap();
    assert!(!st.status.success() && text(&st).contains(&format!("(job {task1}")), "{}", text(&st));
    assert!(Command::new("scancel").arg(&task1).status().unwrap().success());
    wait_for("task 1 to end", 60, || (!live_tasks(&job).contains(&task1)).then_some(()));
    // The same command again submits only the missing task.
    let again = submit();
    let job2 = submitted_job(&again);
    assert!(
        text(&again).contains("submitting the 1 missing") && text(&again).contains("(1 task(s))"),
        "{}",
        text(&again)
    );
    wait_for("every task to end", 180, || (live_tasks(&job).is_empty() && live_tasks(&job2).is_empty()).then_some(()));
    let logs: String = std::fs::read_dir(dir.path().join("slurm"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".out"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert_eq!(&results(dir.path()), reference(), "{logs}");
    assert!(logs.contains("stopped by SIGTERM"), "{logs}");
    // No finished cell ran twice: only the cancelled task's cell has a second claim, a resume.
    let c = claims(dir.path());
    let twice: Vec<&String> = c.iter().filter(|(_, v)| v.len() > 1).map(|(k, _)| k).collect();
    let cancelled = cell.file_name().unwrap().to_string_lossy().into_owned();
    assert!(twice.is_empty() || twice == [&cancelled], "{twice:?}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cell.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["claims"][0]["job"].as_str(), Some(task1.as_str()));
    let st = loralab().args(["status", &dir.path().display().to_string()]).output().unwrap();
    assert!(st.status.success() && text(&st).contains("8 finished"), "{}", text(&st));
    // Once complete, the command submits nothing and says so.
    assert!(text(&submit()).contains("nothing to submit: every cell"), "complete");
}
