//! `lab.sys`: facts about the running process, for benchmarks and logs.

use std::time::Instant;

use mlua::{Lua, Table};

/// Peak resident memory of this process in MiB (VmHWM), where the system reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Memory the system could give this process now (MemAvailable), where it reports it.
pub fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    let start = Instant::now();
    m.set("peak_rss_mb", lua.create_function(|_, ()| Ok(peak_rss_mb()))?)?;
    m.set("time", lua.create_function(move |_, ()| Ok(start.elapsed().as_secs_f64()))?)?;
    m.set(
        "threads",
        lua.create_function(|_, ()| Ok(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)))?,
    )?;
    m.set(
        "sleep",
        lua.create_function(|_, seconds: f64| {
            if !seconds.is_finite() || seconds < 0.0 {
                return Err(mlua::Error::runtime(format!("lab.sys.sleep: {seconds} is not a number of seconds >= 0")));
            }
            crate::interrupt::sleep(seconds).map_err(|e| mlua::Error::runtime(e.to_string()))
        })?,
    )?;
    Ok(m)
}
