//! A cell's folder on disk, and the lease by which one worker at a time runs it.
//!
//! Several workers (processes on one host, or Slurm array tasks on many) may run the same script
//! on the same run folder; the folder is their only coordinator. A cell's folder holds:
//!
//! - `key.json`, what determines the result (written when the folder is made);
//! - `lease.json`, who runs it now: host, pid, Slurm job, worker, and a heartbeat time that the
//!   holder refreshes; with `.lock`, an OS lock (`flock`) the holder keeps while it runs, so that
//!   a holder that dies on this host frees the cell at once;
//! - `claims.jsonl`, one line per claim (who, when), kept to show how often a cell was started;
//! - `result.json` when it finished (its presence alone means finished), or `failed.json`.
//!
//! A lease whose heartbeat is older than the time-to-live is taken over even though its lock is
//! held: a worker on another host may have died without the shared file system noticing. Nothing
//! depends on the lock for correctness: a cell run twice gives the same result, and results are
//! published by atomic rename, so a second publish is harmless.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::store::write_atomic;

pub const RESULT: &str = "result.json";
pub const FAILED: &str = "failed.json";
pub const LEASE: &str = "lease.json";
pub const LOCK: &str = ".lock";
pub const KEY: &str = "key.json";
pub const CLAIMS: &str = "claims.jsonl";

/// The time-to-live of a lease when `LORALAB_LEASE_TTL` does not set one, in seconds.
pub const DEFAULT_TTL: f64 = 300.0;

/// The lease time-to-live: `LORALAB_LEASE_TTL` seconds, else [`DEFAULT_TTL`].
pub fn lease_ttl() -> f64 {
    std::env::var("LORALAB_LEASE_TTL")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(DEFAULT_TTL)
}

/// Who this process is, as leases and results record it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Identity {
    pub host: String,
    pub pid: u32,
    /// The Slurm job (`ARRAYJOB_TASK`, or the job id) when running under Slurm.
    #[serde(default)]
    pub job: Option<String>,
    /// The worker's name within its launch (`w0`, `slurm-12_3`), when started as a worker.
    #[serde(default)]
    pub worker: Option<String>,
    /// The launch this process belongs to: every worker of one `loralab run --workers/--gpus`
    /// or of one Slurm submission shares it. A cell that failed in this launch is not retried by
    /// its other workers; a later launch (a rerun) retries it.
    pub launch: String,
}

static IDENTITY: OnceLock<Identity> = OnceLock::new();
static WORKER_NAME: OnceLock<String> = OnceLock::new();

/// Names this process as a worker (`loralab run --worker NAME`); call before [`identity`].
pub fn set_worker_name(name: &str) {
    let _ = WORKER_NAME.set(name.to_string());
}

/// This process's identity, read once from the environment.
pub fn identity() -> &'static Identity {
    IDENTITY.get_or_init(|| {
        let host = hostname();
        let pid = std::process::id();
        let job = match (std::env::var("SLURM_ARRAY_JOB_ID"), std::env::var("SLURM_ARRAY_TASK_ID")) {
            (Ok(j), Ok(t)) => Some(format!("{j}_{t}")),
            _ => std::env::var("SLURM_JOB_ID").ok(),
        };
        let worker = WORKER_NAME.get().cloned().or_else(|| std::env::var("LORALAB_WORKER").ok());
        let launch = std::env::var("LORALAB_LAUNCH")
            .ok()
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| format!("{host}-{pid}-{}", now_unix() as u64));
        Identity { host, pid, job, worker, launch }
    })
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // Safety: the buffer is valid for its length; gethostname NUL-terminates within it or fails.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

pub fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The content of `lease.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Holder {
    #[serde(flatten)]
    pub who: Identity,
    pub started_at: f64,
    pub heartbeat: f64,
    /// Distinguishes two claims by one process, so that a holder never removes a lease that a
    /// later claim (its own or another's) wrote.
    pub token: String,
}

impl Holder {
    pub fn age(&self) -> f64 {
        (now_unix() - self.heartbeat).max(0.0)
    }

    /// "host pid 123 (job 4_1, worker w0)".
    pub fn describe(&self) -> String {
        let mut s = format!("{} pid {}", self.who.host, self.who.pid);
        let extra: Vec<String> = [
            self.who.job.as_ref().map(|j| format!("job {j}")),
            self.who.worker.as_ref().map(|w| format!("worker {w}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !extra.is_empty() {
            s.push_str(&format!(" ({})", extra.join(", ")));
        }
        s
    }
}

/// What `failed.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failure {
    pub name: String,
    pub error: String,
    pub attempts: usize,
    #[serde(default)]
    pub out_of_memory: bool,
    pub finished_at: f64,
    #[serde(default)]
    pub launch: String,
}

/// A cell's state as seen from outside (by `loralab status`).
#[derive(Debug)]
pub enum State {
    Finished,
    Failed(Failure),
    /// Held by a live worker.
    Running(Holder),
    /// A lease is there but its holder is gone (lock free) or silent (heartbeat past the TTL).
    Stale(Holder),
    NotStarted,
}

pub fn read_lease(dir: &Path) -> Option<Holder> {
    let text = std::fs::read_to_string(dir.join(LEASE)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn read_failure(dir: &Path) -> Option<Failure> {
    let text = std::fs::read_to_string(dir.join(FAILED)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The state of the cell in `dir`, read without changing anything (the lock is only probed).
pub fn state(dir: &Path, ttl: f64) -> anyhow::Result<State> {
    if dir.join(RESULT).exists() {
        return Ok(State::Finished);
    }
    if let Some(h) = read_lease(dir) {
        let live = h.age() <= ttl && (lock_is_held(dir)? || !holder_died_here(&h));
        return Ok(if live { State::Running(h) } else { State::Stale(h) });
    }
    if let Some(f) = read_failure(dir) {
        return Ok(State::Failed(f));
    }
    Ok(State::NotStarted)
}

fn open_lock_file(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(LOCK);
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open lock file {}", path.display()))
}

/// Whether some process holds the cell's lock now.
fn lock_is_held(dir: &Path) -> anyhow::Result<bool> {
    if !dir.join(LOCK).exists() {
        return Ok(false);
    }
    let file = open_lock_file(dir)?;
    match try_lock(&file, &dir.join(LOCK))? {
        true => {
            let _ = file.unlock();
            Ok(false)
        }
        false => Ok(true),
    }
}

/// Tries the lock without waiting: Ok(true) when taken. A file system without locks is an error
/// that says what to do; correctness never depends on the lock, but the claim protocol does.
pub fn try_lock(file: &File, path: &Path) -> anyhow::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(lock_error(e, path)),
    }
}

/// An error from `flock`, explained where the file system does not support locks.
pub fn lock_error(e: std::io::Error, path: &Path) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::ENOLCK) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => anyhow::anyhow!(
            "cannot lock {}: the file system does not support locks ({e}). Put the run folder on a \
             file system that does: a local disk, NFS with its lock service running (flock is emulated \
             with fcntl locks there), or Lustre mounted with -o flock (localflock locks within one \
             node only)",
            path.display()
        ),
        _ => anyhow::anyhow!("cannot lock {}: {e}", path.display()),
    }
}

/// The outcome of trying to claim a cell.
pub enum Claim {
    Finished,
    /// Failed earlier in this launch: every worker reports the same failure.
    Failed(Failure),
    /// Another worker runs it (None: it has just locked it and not yet written its lease).
    Held(Option<Holder>),
    Ours(Lease),
}

/// Tries to claim the cell in `dir` for this process.
pub fn claim(dir: &Path, ttl: f64) -> anyhow::Result<Claim> {
    if dir.join(RESULT).exists() {
        return Ok(Claim::Finished);
    }
    let file = open_lock_file(dir)?;
    if try_lock(&file, &dir.join(LOCK))? {
        // Re-check under the lock: the previous holder may have finished just now.
        if dir.join(RESULT).exists() {
            return Ok(Claim::Finished);
        }
        if let Some(f) = read_failure(dir).filter(|f| f.launch == identity().launch) {
            return Ok(Claim::Failed(f));
        }
        let previous = read_lease(dir);
        if let Some(p) = &previous {
            // A fresh lease without the lock: a worker that took the cell over runs it unlocked.
            if p.age() <= ttl && !holder_died_here(p) && p.who != *identity() {
                return Ok(Claim::Held(Some(p.clone())));
            }
            if p.who != *identity() {
                eprintln!("cell {}: resuming it; it was started by {}, which is gone", cell_name(dir), p.describe());
            }
        }
        return Ok(Claim::Ours(Lease::start(dir, Some(file), ttl, previous.is_some())?));
    }
    let Some(holder) = read_lease(dir) else { return Ok(Claim::Held(None)) };
    if holder.age() <= ttl {
        return Ok(Claim::Held(Some(holder)));
    }
    // The holder keeps the lock but has not beaten for longer than the TTL: it died on another
    // host (or hangs). One claimant wins the takeover: the marker's exclusive create decides.
    let marker = dir.join(format!(".takeover-{}", holder.token));
    match OpenOptions::new().write(true).create_new(true).open(&marker) {
        Ok(_) => {
            eprintln!(
                "cell {}: taking it over from {}, whose heartbeat is {:.0} s old (time-to-live {:.0} s)",
                cell_name(dir),
                holder.describe(),
                holder.age(),
                ttl
            );
            Ok(Claim::Ours(Lease::start(dir, None, ttl, true)?))
        }
        Err(_) => Ok(Claim::Held(Some(holder))),
    }
}

/// Whether a lease's holder was a process of this host that no longer exists.
fn holder_died_here(h: &Holder) -> bool {
    h.who.host == identity().host && !process_alive(h.who.pid as i32)
}

pub fn cell_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// A held claim on a cell: the lock (unless taken over), `lease.json`, and a thread that keeps
/// its heartbeat fresh. Dropping it releases all three.
pub struct Lease {
    dir: PathBuf,
    token: String,
    _lock: Option<File>,
    stop: Option<mpsc::Sender<()>>,
    beat: Option<std::thread::JoinHandle<()>>,
}

impl Lease {
    fn start(dir: &Path, lock: Option<File>, ttl: f64, resumed: bool) -> anyhow::Result<Lease> {
        let now = now_unix();
        let token = format!("{}-{}-{}", identity().pid, (now * 1e6) as u64, next_counter());
        let holder = Holder { who: identity().clone(), started_at: now, heartbeat: now, token: token.clone() };
        write_lease(dir, &holder)?;
        append_claim(dir, &holder, resumed)?;
        let (stop, beat) = heartbeat(dir.to_path_buf(), holder, ttl);
        Ok(Lease { dir: dir.to_path_buf(), token, _lock: lock, stop: Some(stop), beat: Some(beat) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(b) = self.beat.take() {
            let _ = b.join();
        }
        // Remove the lease only if it is still ours: a takeover may have replaced it.
        if read_lease(&self.dir).is_some_and(|h| h.token == self.token) {
            let _ = std::fs::remove_file(self.dir.join(LEASE));
        }
    }
}

fn next_counter() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn write_lease(dir: &Path, holder: &Holder) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(holder)? + "\n";
    write_atomic(&dir.join(LEASE), text.as_bytes())
        .with_context(|| format!("cannot write {}", dir.join(LEASE).display()))
}

fn append_claim(dir: &Path, holder: &Holder, resumed: bool) -> anyhow::Result<()> {
    let mut line = serde_json::to_value(&holder.who)?;
    line["started_at"] = holder.started_at.into();
    line["resumed"] = resumed.into();
    let path = dir.join(CLAIMS);
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // One write of a whole line: appends of a few hundred bytes do not interleave.
    f.write_all(format!("{line}\n").as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

/// The claims of a cell, oldest first.
pub fn read_claims(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(CLAIMS))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Rewrites the lease every quarter of the TTL until told to stop, while it is still ours.
fn heartbeat(dir: PathBuf, mut holder: Holder, ttl: f64) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<()>();
    let period = Duration::from_secs_f64((ttl / 4.0).clamp(0.2, 60.0));
    let handle = std::thread::spawn(move || loop {
        match rx.recv_timeout(period) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return, // stopped, or the lease was dropped
        }
        if read_lease(&dir).is_none_or(|h| h.token != holder.token) {
            eprintln!("cell {}: another worker took this cell over; its result will be the same", cell_name(&dir));
            return;
        }
        holder.heartbeat = now_unix();
        let _ = write_lease(&dir, &holder);
    });
    (tx, handle)
}

/// Removes temporary files that writers killed mid-write left in `dir` (`.NAME.tmp-PID-N`), where
/// PID is a process of this host that no longer exists. Called by the claimant, under the lock.
pub fn remove_dead_writers_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.split(".tmp-").nth(1) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if pid as u32 != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether a process of this host exists (kill with signal 0).
pub fn process_alive(pid: i32) -> bool {
    // Safety: signal 0 checks only for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_cell_is_held_for_others_and_free_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let lease = match claim(dir.path(), 60.0).unwrap() {
            Claim::Ours(l) => l,
            _ => panic!("a fresh cell is claimable"),
        };
        let holder = read_lease(dir.path()).unwrap();
        assert_eq!(holder.who.pid, std::process::id());
        // The lock is per open file: a second open in this process sees it held.
        assert!(matches!(claim(dir.path(), 60.0).unwrap(), Claim::Held(Some(_))));
        assert!(matches!(state(dir.path(), 60.0).unwrap(), State::Running(_)));
        drop(lease);
        assert!(read_lease(dir.path()).is_none());
        assert!(matches!(state(dir.path(), 60.0).unwrap(), State::NotStarted));
        assert_eq!(read_claims(dir.path()).len(), 1);
    }

    #[test]
    fn a_lease_past_its_time_to_live_is_taken_over_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = match claim(dir.path(), 60.0).unwrap() {
            Claim::Ours(l) => l,
            _ => panic!(),
        };
        // A holder that stopped beating: its heartbeat lies in the past.
        let mut h = read_lease(dir.path()).unwrap();
        h.heartbeat -= 120.0;
        write_lease(dir.path(), &h).unwrap();
        let second = claim(dir.path(), 60.0).unwrap();
        assert!(matches!(second, Claim::Ours(_)), "a silent holder is taken over");
        // A third claimant sees the new, fresh lease.
        assert!(matches!(claim(dir.path(), 60.0).unwrap(), Claim::Held(Some(_))));
        drop(second);
        drop(first);
        assert_eq!(read_claims(dir.path()).len(), 2);
    }

    #[test]
    fn a_finished_cell_is_never_claimed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RESULT), "{}").unwrap();
        assert!(matches!(claim(dir.path(), 60.0).unwrap(), Claim::Finished));
    }

    #[test]
    fn a_failure_of_this_launch_is_final_and_one_of_another_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Failure {
            name: "c".into(),
            error: "boom".into(),
            attempts: 2,
            out_of_memory: false,
            finished_at: 0.0,
            launch: identity().launch.clone(),
        };
        std::fs::write(dir.path().join(FAILED), serde_json::to_string(&f).unwrap()).unwrap();
        assert!(matches!(claim(dir.path(), 60.0).unwrap(), Claim::Failed(_)));
        f.launch = "an-earlier-launch".into();
        std::fs::write(dir.path().join(FAILED), serde_json::to_string(&f).unwrap()).unwrap();
        assert!(matches!(claim(dir.path(), 60.0).unwrap(), Claim::Ours(_)));
    }

    #[test]
    fn temporary_files_of_dead_writers_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join(format!(".result.json.tmp-{}-0.json", i32::MAX - 1));
        let mine = dir.path().join(format!(".result.json.tmp-{}-0.json", std::process::id()));
        std::fs::write(&dead, "{").unwrap();
        std::fs::write(&mine, "{").unwrap();
        remove_dead_writers_files(dir.path());
        assert!(!dead.exists());
        assert!(mine.exists());
    }
}
