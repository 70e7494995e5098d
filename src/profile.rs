//! Where a pass's time goes, phase by phase, when `LORALAB_PROFILE` is set (to anything but
//! `0`): each phase waits for its device before and after it, so that the GPU time of the
//! kernels it queued is charged to it, and [`report`] gives the totals. The waits serialise what
//! would otherwise overlap (the host queueing the next kernels while the GPU runs), so the
//! phases add up to more than an unprofiled pass takes: compare the shares, and the total with
//! an unprofiled run of the same shape. Unset, a phase costs one load of a flag.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use candle_core::Device;

/// Whether phases are timed (read once, from `LORALAB_PROFILE`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("LORALAB_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// Seconds and calls per phase, in the order of their names.
static TOTALS: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// A phase being timed: from [`phase`] until it is dropped.
pub struct Phase {
    name: &'static str,
    device: Device,
    start: Instant,
}

/// Times the phase `name` on `device` until the returned value is dropped; None when profiling is
/// off.
pub fn phase(name: &'static str, device: &Device) -> Option<Phase> {
    if !enabled() {
        return None;
    }
    let _ = device.synchronize();
    Some(Phase { name, device: device.clone(), start: Instant::now() })
}

impl Drop for Phase {
    fn drop(&mut self) {
        let _ = self.device.synchronize();
        let seconds = self.start.elapsed().as_secs_f64();
        if let Ok(mut totals) = TOTALS.lock() {
            let entry = totals.entry(self.name).or_insert((0.0, 0));
            entry.0 += seconds;
            entry.1 += 1;
        }
    }
}

/// The phases' totals so far as a table (seconds, share of the phases' sum, calls, and
/// milliseconds per `per` units, e.g. decoding steps: a phase that also ran outside them, as in
/// prefill, is charged in full), and clears them. None when nothing was timed.
pub fn report(per: usize, unit: &str) -> Option<String> {
    let mut totals = TOTALS.lock().ok()?;
    if totals.is_empty() {
        return None;
    }
    let sum: f64 = totals.values().map(|(s, _)| s).sum();
    let mut out =
        format!("{:<28} {:>9} {:>7} {:>9} {:>12}\n", "phase", "seconds", "share", "calls", format!("ms/{unit}"));
    let mut rows: Vec<_> = totals.iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    for (name, (s, calls)) in rows {
        // No steps (a prefill alone): the column says so rather than NaN.
        let per_unit = match per {
            0 => "-".to_string(),
            _ => format!("{:.3}", s * 1e3 / per as f64),
        };
        out += &format!("{name:<28} {s:>9.3} {:>6.1}% {calls:>9} {per_unit:>12}\n", 100.0 * s / sum.max(1e-12));
    }
    out += &format!("{:<28} {sum:>9.3}\n", "sum of phases");
    totals.clear();
    Some(out)
}
