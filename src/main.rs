fn main() {
    keep_freed_memory();
    count_threads_once();
    match loralab::cli::run() {
        Ok(status) => std::process::exit(status),
        Err(e) => {
            // A stop by a signal is not an error of the script: say where it stopped and how to go on.
            if let Some(sig) = loralab::interrupt::requested() {
                let at = loralab::interrupt::activity();
                eprintln!(
                    "stopped by {}{}: finished cells are kept; rerun the same command to resume",
                    loralab::interrupt::signal_name(sig),
                    if at.is_empty() { String::new() } else { format!(" during {at}") }
                );
                std::process::exit(loralab::interrupt::exit_status(sig));
            }
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// glibc hands large blocks straight to the kernel (mmap) and gives freed memory back (trim), so
/// every large tensor of a training step is mapped, faulted in page by page and zeroed afresh:
/// about a tenth of a CPU training step. Kept in the process's heap instead, freed blocks serve
/// the next step's tensors.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // Safety: mallopt only sets allocator parameters; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// candle asks for its thread count at every CPU matrix product, and unless RAYON_NUM_THREADS is
/// set it counts the physical cores by reading /proc/cpuinfo each time: about a thousand reads per
/// training step. Its answer, taken once, is set for the process instead.
fn count_threads_once() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // Safety: no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
}
