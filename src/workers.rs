//! `loralab run SCRIPT --gpus 0,1,2,3` / `--workers N`: the same script in N worker processes on
//! one host, sharing the run folder.
//!
//! Each worker is `loralab run SCRIPT --worker wI` with the same settings; on GPUs it sees one
//! device through `CUDA_VISIBLE_DEVICES` (a value already set, by Slurm or the user, is split,
//! never overridden). The run folder coordinates them (see [`crate::cells`]): nothing here
//! assigns cells. Their output is interleaved line by line with a `[wI]` prefix, except the
//! groups' progress lines, shown once for all workers with `[all]`. A worker that
//! crashes stops no other: its cell's lock is freed and another worker takes the cell over.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;

use crate::interrupt;

/// Where each worker runs: a GPU (its `CUDA_VISIBLE_DEVICES` value) or the CPU.
#[derive(Clone, Debug, PartialEq)]
pub struct Slot {
    pub name: String,
    pub cuda_visible_devices: Option<String>,
}

/// The slots for `--gpus LIST`: indices into `CUDA_VISIBLE_DEVICES` where it is set (`visible`),
/// else into the machine's GPUs (`count` of them). An index that does not exist is an error. An
/// index given twice puts two workers on that GPU (`0,0`: for models far smaller than the GPU).
pub fn gpu_slots(list: &str, visible: Option<&str>, count: Option<usize>) -> anyhow::Result<Vec<Slot>> {
    let wanted: Vec<usize> = list
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<usize>().map_err(|_| anyhow::anyhow!("--gpus {list}: '{s}' is not a GPU index")))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!wanted.is_empty(), "--gpus {list}: no GPU index given (e.g. --gpus 0,1)");
    let devices: Vec<String> = match visible {
        Some(v) => v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        None => (0..count.unwrap_or(0)).map(|i| i.to_string()).collect(),
    };
    let source = match visible {
        Some(v) => format!("CUDA_VISIBLE_DEVICES={v} makes {} visible", devices.len()),
        None => format!("this machine has {} NVIDIA GPU(s)", devices.len()),
    };
    wanted
        .iter()
        .enumerate()
        .map(|(i, &g)| {
            let device = devices.get(g).ok_or_else(|| {
                anyhow::anyhow!("--gpus {list}: there is no GPU {g}: {source} (indices 0..{})", devices.len())
            })?;
            Ok(Slot { name: format!("w{i}"), cuda_visible_devices: Some(device.clone()) })
        })
        .collect()
}

/// The NVIDIA GPUs the driver reports, if any.
pub fn gpu_count() -> Option<usize> {
    let from_proc = std::fs::read_dir("/proc/driver/nvidia/gpus").ok().map(|d| d.count());
    if from_proc.is_some_and(|n| n > 0) {
        return from_proc;
    }
    let out = Command::new("nvidia-smi").arg("-L").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("GPU ")).count())
}

/// `n` CPU workers.
pub fn cpu_slots(n: usize) -> anyhow::Result<Vec<Slot>> {
    anyhow::ensure!(n >= 1, "--workers {n}: at least one worker");
    Ok((0..n).map(|i| Slot { name: format!("w{i}"), cuda_visible_devices: None }).collect())
}

/// Runs the script in one worker per slot and waits for all of them. Returns the exit status:
/// 0 when every worker finished the script (workers that crashed count as long as another
/// finished: their cells were taken over); else the first failing worker's status.
pub fn launch(script: &Path, settings: &[(String, String)], slots: &[Slot]) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("cannot find the loralab binary to start workers")?;
    let me = crate::cells::identity();
    let launch_id = format!("{}-{}-{}", me.host, me.pid, crate::cells::now_unix() as u64);
    // CPU workers share the cores instead of each spinning up a thread per core.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / slots.len()).max(1);
    let mut children: Vec<(String, Child)> = Vec::new();
    let mut pumps = Vec::new();
    for slot in slots {
        let mut cmd = Command::new(&exe);
        cmd.arg("run").arg(script);
        for (k, v) in settings {
            cmd.arg("--set").arg(format!("{k}={v}"));
        }
        cmd.arg("--worker").arg(&slot.name);
        cmd.env("LORALAB_LAUNCH", &launch_id).stdout(Stdio::piped()).stderr(Stdio::piped());
        match &slot.cuda_visible_devices {
            Some(d) => {
                cmd.env("CUDA_VISIBLE_DEVICES", d);
            }
            None => {
                if std::env::var_os("RAYON_NUM_THREADS").is_none() {
                    cmd.env("RAYON_NUM_THREADS", threads.to_string());
                }
            }
        }
        let mut child = cmd.spawn().with_context(|| format!("cannot start worker {}", slot.name))?;
        let where_ = slot.cuda_visible_devices.as_ref().map(|d| format!("GPU {d}")).unwrap_or_else(|| "CPU".into());
        eprintln!("[{}] started (pid {}, {where_})", slot.name, child.id());
        pumps.push(pump(child.stdout.take().expect("piped"), slot.name.clone(), false));
        pumps.push(pump(child.stderr.take().expect("piped"), slot.name.clone(), true));
        children.push((slot.name.clone(), child));
    }
    let statuses = wait_all(&mut children)?;
    for p in pumps {
        let _ = p.join();
    }
    Ok(overall_status(&statuses))
}

/// The progress of each group, as the furthest any worker has seen it: one display for all.
static PROGRESS: Mutex<Vec<(String, usize)>> = Mutex::new(Vec::new());

/// For a group's progress line ("phase 2: 5/16 cells finished or failed"), whether it is news:
/// every worker prints its own view of the same group, the launch shows each step once.
fn progress_is_new(line: &str) -> Option<bool> {
    let rest = line.strip_suffix(" cells finished or failed")?;
    let (label, counts) = rest.rsplit_once(": ")?;
    let (done, total) = counts.split_once('/')?;
    let (done, _total): (usize, usize) = (done.parse().ok()?, total.parse().ok()?);
    let key = format!("{label}/{total}");
    let mut seen = PROGRESS.lock().ok()?;
    match seen.iter_mut().find(|(k, _)| *k == key) {
        Some((_, d)) if *d >= done => Some(false),
        Some((_, d)) => {
            *d = done;
            Some(true)
        }
        None => {
            seen.push((key, done));
            Some(true)
        }
    }
}

/// Copies a worker's output to ours, a line at a time, with its name in front.
fn pump(stream: impl std::io::Read + Send + 'static, name: String, is_err: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).split(b'\n') {
            let Ok(line) = line else { return };
            let text = String::from_utf8_lossy(&line);
            match progress_is_new(&text) {
                Some(true) => {
                    let _ = writeln!(std::io::stdout().lock(), "[all] {text}");
                    continue;
                }
                Some(false) => continue,
                None => {}
            }
            if is_err {
                let _ = writeln!(std::io::stderr().lock(), "[{name}] {text}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "[{name}] {text}");
            }
        }
    })
}

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ended {
    Code(i32),
    Signal(i32),
}

/// Waits for every worker, passing a stop signal on to all of them.
fn wait_all(children: &mut [(String, Child)]) -> anyhow::Result<Vec<Ended>> {
    let mut ended: Vec<Option<Ended>> = vec![None; children.len()];
    let mut forwarded = false;
    while ended.iter().any(Option::is_none) {
        if let (Some(sig), false) = (interrupt::requested(), forwarded) {
            for (i, (_, c)) in children.iter().enumerate() {
                if ended[i].is_none() {
                    // Safety: signalling our own child by its pid.
                    unsafe { libc::kill(c.id() as i32, sig) };
                }
            }
            forwarded = true;
        }
        for (i, (name, child)) in children.iter_mut().enumerate() {
            if ended[i].is_some() {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                use std::os::unix::process::ExitStatusExt;
                let e = match (status.code(), status.signal()) {
                    (Some(c), _) => Ended::Code(c),
                    (None, Some(s)) => Ended::Signal(s),
                    _ => Ended::Code(1),
                };
                match e {
                    Ended::Code(0) => eprintln!("[{name}] finished"),
                    Ended::Code(c) => eprintln!("[{name}] exited with status {c}"),
                    Ended::Signal(s) => eprintln!(
                        "[{name}] was killed by {}; the other workers take over its cell",
                        interrupt::signal_name(s)
                    ),
                }
                ended[i] = Some(e);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(ended.into_iter().map(|e| e.expect("every worker ended")).collect())
}

/// The launch's exit status from its workers'.
pub fn overall_status(ended: &[Ended]) -> i32 {
    if let Some(sig) = interrupt::requested() {
        return interrupt::exit_status(sig);
    }
    if let Some(Ended::Code(c)) = ended.iter().find(|e| matches!(e, Ended::Code(c) if *c != 0)) {
        return *c;
    }
    if ended.contains(&Ended::Code(0)) {
        return 0;
    }
    // Every worker was killed: nobody finished the script.
    match ended.first() {
        Some(Ended::Signal(s)) => interrupt::exit_status(*s),
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_indices_pick_from_an_inherited_cuda_visible_devices() {
        let slots = gpu_slots("0,1", Some("3,5,6"), Some(8)).unwrap();
        assert_eq!(slots[0].cuda_visible_devices.as_deref(), Some("3"));
        assert_eq!(slots[1].cuda_visible_devices.as_deref(), Some("5"));
        let err = gpu_slots("0,3", Some("3,5,6"), Some(8)).unwrap_err().to_string();
        assert!(err.contains("no GPU 3") && err.contains("CUDA_VISIBLE_DEVICES=3,5,6"), "{err}");
    }

    #[test]
    fn a_gpu_index_the_machine_lacks_is_an_error_before_anything_runs() {
        assert_eq!(gpu_slots("0,1", None, Some(2)).unwrap().len(), 2);
        let err = gpu_slots("2", None, Some(2)).unwrap_err().to_string();
        assert!(err.contains("there is no GPU 2") && err.contains("2 NVIDIA GPU"), "{err}");
        assert!(gpu_slots("0", None, None).is_err());
        let shared = gpu_slots("0,0", None, Some(1)).unwrap();
        assert_eq!(
            (shared[0].cuda_visible_devices.as_deref(), shared[1].cuda_visible_devices.as_deref()),
            (Some("0"), Some("0"))
        );
        assert!(gpu_slots("x", None, Some(2)).unwrap_err().to_string().contains("not a GPU index"));
    }

    #[test]
    fn a_groups_progress_is_shown_once_for_all_workers() {
        assert_eq!(progress_is_new("unit-test group: 1/4 cells finished or failed"), Some(true));
        assert_eq!(progress_is_new("unit-test group: 1/4 cells finished or failed"), Some(false));
        assert_eq!(progress_is_new("unit-test group: 2/4 cells finished or failed"), Some(true));
        assert_eq!(progress_is_new("unit-test group: 1/4 cells finished or failed"), Some(false));
        assert_eq!(progress_is_new("cell c1: attempt 1 of 2 failed"), None);
    }

    #[test]
    fn a_launch_succeeds_when_a_crashed_worker_was_covered_by_another() {
        assert_eq!(overall_status(&[Ended::Code(0), Ended::Signal(9)]), 0);
        assert_eq!(overall_status(&[Ended::Code(0), Ended::Code(1)]), 1);
        assert_eq!(overall_status(&[Ended::Signal(9), Ended::Signal(9)]), 137);
    }
}
