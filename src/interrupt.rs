//! Stopping cleanly on a signal.
//!
//! A cluster stops a job with a signal: Slurm sends SIGTERM at the time limit or on preemption,
//! and `--signal=B:USR2@120` gives warning before that; a user presses Ctrl-C (SIGINT). loralab
//! treats SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 alike: the handler only records the signal, and
//! the long loops (training steps, decoding steps, waiting for other workers) check it at their
//! next boundary and return [`Interrupted`]. The cell then releases its lease without recording
//! a failure, so a rerun (or a requeued Slurm task) resumes it. A second Ctrl-C exits at once.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

static SIGNAL: AtomicI32 = AtomicI32::new(0);
static WHERE: Mutex<String> = Mutex::new(String::new());

/// The error a loop returns when a stop was requested.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {}", signal_name(*.0))]
pub struct Interrupted(pub i32);

/// The signals that ask a run to stop.
pub const STOP_SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2];

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe calls here: an atomic swap, and _exit for a repeated Ctrl-C.
    let before = SIGNAL.swap(sig, Ordering::SeqCst);
    if before != 0 && sig == libc::SIGINT {
        unsafe { libc::_exit(130) };
    }
}

/// Installs the handlers; called once at start by the command line.
pub fn install() {
    for sig in STOP_SIGNALS {
        // Safety: the handler only touches an atomic and calls _exit.
        unsafe {
            libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
    }
}

/// The signal received, if a stop was requested.
pub fn requested() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Err([`Interrupted`]) once a stop was requested: call at every step boundary.
pub fn check() -> Result<(), Interrupted> {
    match requested() {
        None => Ok(()),
        Some(s) => Err(Interrupted(s)),
    }
}

/// Notes what the process is doing (a cell, a training step), for the message at exit.
pub fn set_activity(what: impl Into<String>) {
    if let Ok(mut w) = WHERE.lock() {
        *w = what.into();
    }
}

/// What the process was doing when it stopped ("" when nothing was noted).
pub fn activity() -> String {
    WHERE.lock().map(|w| w.clone()).unwrap_or_default()
}

/// The exit status for a stop by `sig`: 128 + the signal's number, as a shell reports it.
pub fn exit_status(sig: i32) -> i32 {
    128 + sig
}

pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGUSR2 => "SIGUSR2".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        other => format!("signal {other}"),
    }
}

/// Sleeps `seconds` in short slices, returning early with [`Interrupted`] on a stop request.
pub fn sleep(seconds: f64) -> Result<(), Interrupted> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds.clamp(0.0, 1e7));
    loop {
        check()?;
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(50)));
    }
}
