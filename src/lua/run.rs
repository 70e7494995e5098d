//! `lab.run`: an experiment's folder of cells, resumable, crash-safe and shared by workers.
//!
//! A cell is one unit of work (train + evaluate one dose, say) named by the caller and keyed by
//! everything that determines its result. Its folder is `runs/<experiment>/<name>-<key hash>/`;
//! `result.json` is written atomically when the cell succeeds and marks it finished, so a rerun
//! returns the stored result instead of redoing the work, and a changed setting (a new key)
//! never reuses a stale one. A failing cell is retried; if it still fails its error is written
//! to `failed.json` and the run goes on.
//!
//! `run:cells(list, fn)` hands over a group of independent cells. One process runs them in
//! order. Several processes running the same script on the same folder (`loralab run --workers`,
//! `--gpus`, a Slurm array) share the group: each claims a cell nobody holds (see
//! [`crate::cells`]), runs it, claims the next, reads back what the others finished, and waits
//! until every cell is finished or failed, so that what follows the group sees the same results
//! in every worker. A cell may write only inside its own folder (`cell.dir`).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use mlua::{Function, Lua, MultiValue, Table, UserData, UserDataMethods, Value};

use super::fs::{from_json, to_json};
use super::opts::Opts;
use crate::cells::{self, Claim, Lease};
use crate::interrupt;
use crate::store::{file_sha256, is_out_of_memory, key_hash, write_atomic};

#[derive(Default)]
struct Tally {
    done: Vec<String>,
    skipped: Vec<String>,
    failed: Vec<(String, String)>,
}

pub struct Run {
    dir: PathBuf,
    started: Instant,
    tally: RefCell<Tally>,
}

#[derive(Clone)]
pub struct LuaRun(Rc<Run>);

/// Cells that failed in this process's runs, for the exit status.
static FAILED_CELLS: AtomicUsize = AtomicUsize::new(0);
/// The run folders this process opened, with their settings (for `complete.json`).
static OPENED: Mutex<Vec<(PathBuf, serde_json::Value)>> = Mutex::new(Vec::new());
/// Set while planning (`loralab slurm`): `lab.run.open` records its folder and stops the script.
static PLAN: Mutex<Option<Option<Plan>>> = Mutex::new(None);
/// The script this process runs, as given on the command line.
static SCRIPT: Mutex<Option<String>> = Mutex::new(None);

/// Where a script keeps its results and with which settings: what `lab.run.open` was given.
#[derive(Clone, Debug)]
pub struct Plan {
    pub dir: PathBuf,
    pub settings: serde_json::Value,
}

/// The message by which planning stops a script at `lab.run.open`.
pub const PLAN_STOP: &str = "loralab: planning stops here";

pub fn set_script(script: &Path) {
    *SCRIPT.lock().unwrap() = Some(script.display().to_string());
}

pub fn failed_cells() -> usize {
    FAILED_CELLS.load(Ordering::SeqCst)
}

pub fn opened_runs() -> Vec<(PathBuf, serde_json::Value)> {
    OPENED.lock().unwrap().clone()
}

/// Turns planning on (`Some`) or off; `take_plan` returns what `lab.run.open` recorded.
pub fn start_planning() {
    *PLAN.lock().unwrap() = Some(None);
}

pub fn take_plan() -> Option<Plan> {
    PLAN.lock().unwrap().take().flatten()
}

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("open", lua.create_function(open)?)?;
    m.set(
        "hash",
        lua.create_function(|lua, v: Value| {
            let json = to_json(lua, &v, "value", 0).map_err(|e| mlua::Error::runtime(format!("lab.run.hash: {e}")))?;
            Ok(key_hash(&json))
        })?,
    )?;
    m.set(
        "file_hash",
        lua.create_function(|_, path: String| {
            file_sha256(std::path::Path::new(&path))
                .map_err(|e| mlua::Error::runtime(format!("lab.run.file_hash: cannot read {path}: {e}")))
        })?,
    )?;
    Ok(m)
}

/// `lab.run.open(dir, {settings})`.
fn open(lua: &Lua, (dir, opts): (String, Value)) -> mlua::Result<LuaRun> {
    let mut o = Opts::new("lab.run.open", opts)?;
    let settings: Option<Value> = o.get(lua, "settings")?;
    o.finish()?;
    let dir = PathBuf::from(dir);
    let settings_json = match &settings {
        Some(s) => to_json(lua, s, "settings", 0).map_err(|e| mlua::Error::runtime(format!("lab.run.open: {e}")))?,
        None => serde_json::Value::Null,
    };
    {
        let mut plan = PLAN.lock().unwrap();
        if let Some(slot) = plan.as_mut() {
            *slot = Some(Plan { dir: dir.clone(), settings: settings_json });
            return Err(mlua::Error::runtime(PLAN_STOP));
        }
    }
    if super::check::checking() {
        super::check::record_run(checked_run(&dir, &settings_json));
        return Ok(LuaRun(Rc::new(Run { dir, started: Instant::now(), tally: RefCell::new(Tally::default()) })));
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| mlua::Error::runtime(format!("lab.run.open: cannot create {}: {e}", dir.display())))?;
    if settings.is_some() {
        record_settings(&dir, &settings_json)?;
    }
    OPENED.lock().unwrap().push((dir.clone(), settings_json));
    Ok(LuaRun(Rc::new(Run { dir, started: Instant::now(), tally: RefCell::new(Tally::default()) })))
}

/// A run folder as checking finds it (nothing is written).
fn checked_run(dir: &Path, settings: &serde_json::Value) -> super::check::CheckedRun {
    let run: Option<serde_json::Value> =
        std::fs::read_to_string(dir.join("run.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    let mut sets: Vec<&serde_json::Value> = Vec::new();
    if let Some(run) = &run {
        sets.extend(run.get("settings"));
        sets.extend(
            run.get("history").and_then(|h| h.as_array()).into_iter().flatten().filter_map(|h| h.get("settings")),
        );
    }
    let other = sets.iter().filter(|s| **s != settings).count();
    super::check::CheckedRun { dir: dir.to_path_buf(), exists: dir.is_dir(), other_settings: other }
}

/// Writes run.json (script, settings, launch), keeping earlier settings sets in `history`.
/// Refuses when other workers are running a different script or settings in the folder.
fn record_settings(dir: &Path, settings: &serde_json::Value) -> mlua::Result<()> {
    let script = SCRIPT.lock().unwrap().clone().unwrap_or_default();
    let path = dir.join("run.json");
    let me = cells::identity();
    let mut history = Vec::new();
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(old) = serde_json::from_str::<serde_json::Value>(&text) {
            let old_script = old["script"].as_str().unwrap_or("").to_string();
            let same = old_script == script && old["settings"] == *settings;
            if !same {
                let busy = running_elsewhere(dir);
                let same_launch = old["launch"].as_str() == Some(me.launch.as_str());
                if same_launch || !busy.is_empty() {
                    return Err(mlua::Error::runtime(format!(
                        "lab.run.open: {} is in use by {} with other settings ({}){}; this process runs {} \
                         with its own. Give one of them another folder (e.g. --set out=...), or wait until \
                         the other finishes",
                        dir.display(),
                        if old_script.is_empty() { "another script".to_string() } else { old_script.clone() },
                        settings_difference(&old["settings"], settings),
                        if busy.is_empty() { String::new() } else { format!(", running in {}", busy.join("; ")) },
                        script
                    )));
                }
            }
            if let Some(h) = old["history"].as_array() {
                history = h.clone();
            }
            if !same {
                let mut previous = old.clone();
                previous.as_object_mut().map(|o| o.remove("history"));
                history.push(previous);
            }
        }
    }
    let meta = serde_json::json!({
        "script": script,
        "settings": settings,
        "launch": me.launch,
        "opened_at": cells::now_unix(),
        "loralab_version": env!("CARGO_PKG_VERSION"),
        "loralab_commit": option_env!("LORALAB_COMMIT").unwrap_or("unknown"),
        "history": history,
    });
    write_json(&path, &meta)
}

/// The holders of cells of `dir` that run now in another launch ("host pid (job)").
fn running_elsewhere(dir: &Path) -> Vec<String> {
    let ttl = cells::lease_ttl();
    let me = &cells::identity().launch;
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| match cells::state(&e.path(), ttl) {
            Ok(cells::State::Running(h)) if h.who.launch != *me => {
                Some(format!("{} by {}", e.file_name().to_string_lossy(), h.describe()))
            }
            _ => None,
        })
        .collect()
}

/// "lr: 0.001 vs 0.0001, seeds: [1] vs [1,2]": the top-level keys whose values differ.
fn settings_difference(a: &serde_json::Value, b: &serde_json::Value) -> String {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return format!("{a} vs {b}") };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .take(6)
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "unset".into());
            format!("{k}: {} there, {} here", show(a.get(k)), show(b.get(k)))
        })
        .collect();
    if diffs.is_empty() {
        "the same settings".into()
    } else {
        diffs.join(", ")
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> mlua::Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(mlua::Error::external)? + "\n";
    write_atomic(path, text.as_bytes())
        .map_err(|e| mlua::Error::runtime(format!("cannot write {}: {e}", path.display())))
}

/// Reads a finished cell's result; a result.json that is not valid JSON (a disk fault, a
/// hand edit) is moved aside with a warning and the cell counts as not finished.
fn read_result(dir: &Path) -> mlua::Result<Option<serde_json::Value>> {
    let path = dir.join(cells::RESULT);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(mlua::Error::runtime(format!("cannot read {}: {e}", path.display()))),
    };
    match serde_json::from_str(&text) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let aside = dir.join(format!("result.json.corrupt-{}", cells::now_unix() as u64));
            eprintln!(
                "warning: {} is not valid JSON ({e}); moved it to {} and the cell runs again",
                path.display(),
                aside.display()
            );
            let _ = std::fs::rename(&path, &aside);
            Ok(None)
        }
    }
}

/// One cell of a group: where it is in the caller's list and what identifies it.
struct Entry {
    slot: Value,
    name: String,
    key: Value,
    key_json: serde_json::Value,
    dir: PathBuf,
    item: Value,
}

/// How a cell of a group ended, for this process.
enum Outcome {
    Result(serde_json::Value, bool),
    Failed(String),
}

impl LuaRun {
    fn entry(&self, lua: &Lua, slot: Value, name: String, key: Value, item: Value, ctx: &str) -> mlua::Result<Entry> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(mlua::Error::runtime(format!("{ctx}: name '{name}' must be a plain folder name")));
        }
        let key_json = to_json(lua, &key, "key", 0).map_err(|e| mlua::Error::runtime(format!("{ctx}({name}): {e}")))?;
        let dir = self.0.dir.join(format!("{name}-{}", key_hash(&key_json)));
        Ok(Entry { slot, name, key, key_json, dir, item })
    }

    /// Makes the cell's folder with its key.json, so that `loralab status` lists it from the start.
    fn prepare(&self, e: &Entry) -> mlua::Result<()> {
        std::fs::create_dir_all(&e.dir)
            .map_err(|err| mlua::Error::runtime(format!("cannot create {}: {err}", e.dir.display())))?;
        if !e.dir.join(cells::KEY).exists() {
            write_json(&e.dir.join(cells::KEY), &e.key_json)?;
        }
        Ok(())
    }

    /// Runs a group of cells to the end (finished or failed), sharing it with other workers.
    fn run_group(
        &self,
        lua: &Lua,
        entries: &[Entry],
        f: &Function,
        retries: usize,
        label: &str,
    ) -> mlua::Result<Vec<Outcome>> {
        if super::check::checking() {
            return entries.iter().map(|e| self.check_cell(e, label)).collect();
        }
        for e in entries {
            self.prepare(e)?;
        }
        let ttl = cells::lease_ttl();
        let mut outcomes: Vec<Option<Outcome>> = entries.iter().map(|_| None).collect();
        let mut last_wait_note = String::new();
        let total = entries.len();
        loop {
            let mut ran_one = false;
            let mut held = Vec::new();
            for (i, e) in entries.iter().enumerate() {
                if outcomes[i].is_some() {
                    continue;
                }
                check_interrupt()?;
                match cells::claim(&e.dir, ttl).map_err(|err| mlua::Error::runtime(format!("{err:#}")))? {
                    Claim::Finished => {
                        if let Some(v) = read_result(&e.dir)? {
                            self.0.tally.borrow_mut().skipped.push(e.name.clone());
                            outcomes[i] = Some(Outcome::Result(v, true));
                        }
                    }
                    Claim::Failed(failure) => {
                        self.count_failure(&e.name, &failure.error);
                        outcomes[i] = Some(Outcome::Failed(failure.error));
                    }
                    Claim::Held(h) => held.push(match h {
                        Some(h) => format!("{} ({})", e.name, h.describe()),
                        None => e.name.clone(),
                    }),
                    Claim::Ours(lease) => {
                        outcomes[i] = Some(self.run_claimed(lua, e, f, lease, retries)?);
                        ran_one = true;
                        let finished = outcomes.iter().filter(|o| o.is_some()).count();
                        if total > 1 && !label.is_empty() {
                            println!("{label}: {finished}/{total} cells finished or failed");
                        }
                        // Start again from the top: the list's order is the preferred order.
                        break;
                    }
                }
            }
            if outcomes.iter().all(Option::is_some) {
                break;
            }
            if !ran_one {
                let note = format!("waiting for {} cell(s) that other workers run: {}", held.len(), held.join(", "));
                if !held.is_empty() && note != last_wait_note {
                    eprintln!("{note}");
                    last_wait_note = note;
                }
                interrupt::sleep((ttl / 8.0).clamp(0.2, 2.0)).map_err(stopped)?;
            }
        }
        Ok(outcomes.into_iter().map(|o| o.expect("every cell ended")).collect())
    }

    /// A cell as checking sees it: its stored result, or an error that says why it is missing.
    fn check_cell(&self, e: &Entry, label: &str) -> mlua::Result<Outcome> {
        use super::check::NOT_RUN;
        let state = if e.dir.is_dir() {
            cells::state(&e.dir, cells::lease_ttl()).map_err(|err| mlua::Error::runtime(format!("{err:#}")))?
        } else {
            cells::State::NotStarted
        };
        let not_run = |why: &str| Outcome::Failed(format!("{}: {why}{NOT_RUN}", e.name));
        let (state, detail, outcome) = match state {
            cells::State::Finished => match read_result(&e.dir)? {
                Some(v) => ("finished", None, Outcome::Result(v, true)),
                None => ("not started", None, not_run("")),
            },
            cells::State::Failed(f) => {
                ("failed", f.error.lines().next().map(String::from), not_run("failed earlier, would be retried: "))
            }
            cells::State::Running(h) => ("running", Some(h.describe()), not_run("running elsewhere: ")),
            cells::State::Stale(h) => {
                ("interrupted", Some(format!("by {}", h.describe())), not_run("interrupted, would be resumed: "))
            }
            cells::State::NotStarted => ("not started", None, not_run("")),
        };
        let group = if label.is_empty() { format!("cell {}", e.name) } else { label.to_string() };
        super::check::record_cell(super::check::CheckedCell {
            group,
            name: e.name.clone(),
            dir: e.dir.clone(),
            state,
            detail,
        });
        Ok(outcome)
    }

    fn count_failure(&self, name: &str, error: &str) {
        self.0.tally.borrow_mut().failed.push((name.to_string(), error.to_string()));
        FAILED_CELLS.fetch_add(1, Ordering::SeqCst);
    }

    /// Records in run.json the models loaded so far (the script opens its run folder before it
    /// loads them), once per process.
    fn note_models(&self) {
        let models = crate::model::loaded_models();
        let path = self.0.dir.join("run.json");
        let Ok(text) = std::fs::read_to_string(&path) else { return };
        let Ok(mut run) = serde_json::from_str::<serde_json::Value>(&text) else { return };
        if models.is_empty() || run["models"] == serde_json::Value::Array(models.clone()) {
            return;
        }
        run["models"] = serde_json::Value::Array(models);
        let _ = write_json(&path, &run);
    }

    /// Runs a cell this process holds: attempts, then result.json (or failed.json).
    fn run_claimed(&self, lua: &Lua, e: &Entry, f: &Function, lease: Lease, retries: usize) -> mlua::Result<Outcome> {
        self.note_models();
        let dir = lease.dir().to_path_buf();
        cells::remove_dead_writers_files(&dir);
        interrupt::set_activity(format!("cell {}", e.name));
        let started = Instant::now();
        let started_at = cells::now_unix();
        let mut last_error = String::new();
        let mut oom = false;
        for attempt in 1..=retries + 1 {
            check_interrupt()?;
            let ctx = lua.create_table()?;
            ctx.set("name", e.name.clone())?;
            ctx.set("dir", dir.display().to_string())?;
            ctx.set("attempt", attempt)?;
            ctx.set("key", e.key.clone())?;
            ctx.set("oom", oom)?;
            if !last_error.is_empty() {
                ctx.set("previous_error", last_error.clone())?;
            }
            let returned = f.call::<Value>((ctx, e.item.clone())).and_then(|v| {
                to_json(lua, &v, "result", 0)
                    .map_err(|err| mlua::Error::runtime(format!("run:cell({}): the cell returned {err}", e.name)))
            });
            // What the attempt built (models, adapters) is freed before the next cell or retry.
            super::free_unreachable(lua)?;
            match returned {
                Ok(json) => {
                    let me = cells::identity();
                    let meta = serde_json::json!({
                        "name": e.name, "attempts": attempt, "seconds": started.elapsed().as_secs_f64(),
                        "started_at": started_at, "finished_at": cells::now_unix(),
                        "host": me.host, "pid": me.pid, "job": me.job, "worker": me.worker, "launch": me.launch,
                        "claims": cells::read_claims(&dir),
                        // Which weights produced this result: every model the process had loaded.
                        "models": crate::model::loaded_models(),
                        "loralab_version": env!("CARGO_PKG_VERSION"),
                        "loralab_commit": option_env!("LORALAB_COMMIT").unwrap_or("unknown"),
                    });
                    write_json(&dir.join("meta.json"), &meta)?;
                    // result.json last: its presence means the cell is finished.
                    write_json(&dir.join(cells::RESULT), &json)?;
                    let _ = std::fs::remove_file(dir.join(cells::FAILED));
                    drop(lease);
                    self.0.tally.borrow_mut().done.push(e.name.clone());
                    return Ok(Outcome::Result(json, false));
                }
                Err(err) => {
                    if let Some(sig) = interrupt::requested() {
                        // Not a failure: the lease goes back (dropped on return) and a rerun resumes.
                        let why = super::describe_lua_error(&err);
                        let why = why.lines().next().unwrap_or("").to_string();
                        interrupt::set_activity(format!("cell {} ({why})", e.name));
                        return Err(mlua::Error::runtime(format!(
                            "interrupted by {} in cell {}: rerun the same command to resume it",
                            interrupt::signal_name(sig),
                            e.name
                        )));
                    }
                    last_error = super::describe_lua_error(&err);
                    oom = is_out_of_memory(&last_error);
                    eprintln!(
                        "cell {}: attempt {attempt} of {} failed: {}",
                        e.name,
                        retries + 1,
                        last_error.lines().next().unwrap_or("")
                    );
                }
            }
        }
        let failure = cells::Failure {
            name: e.name.clone(),
            error: last_error.clone(),
            attempts: retries + 1,
            out_of_memory: oom,
            finished_at: cells::now_unix(),
            launch: cells::identity().launch.clone(),
        };
        write_json(&dir.join(cells::FAILED), &serde_json::to_value(&failure).map_err(mlua::Error::external)?)?;
        drop(lease);
        self.count_failure(&e.name, &last_error);
        Ok(Outcome::Failed(last_error))
    }

    /// `run:cell(name, key, fn, {retries})` -> result, reused; or nil and the error.
    fn cell(&self, lua: &Lua, name: String, key: Value, f: Function, opts: Value) -> mlua::Result<MultiValue> {
        let mut o = Opts::new("run:cell", opts)?;
        let retries: usize = o.get_or(lua, "retries", 1)?;
        o.finish()?;
        let entry = self.entry(lua, Value::Integer(1), name, key, Value::Nil, "run:cell")?;
        let outcome = self.run_group(lua, std::slice::from_ref(&entry), &f, retries, "")?;
        Ok(match outcome.into_iter().next().expect("one cell") {
            Outcome::Result(v, reused) => MultiValue::from_vec(vec![from_json(lua, &v)?, Value::Boolean(reused)]),
            Outcome::Failed(err) => MultiValue::from_vec(vec![Value::Nil, Value::String(lua.create_string(&err)?)]),
        })
    }

    /// `run:cells(list, fn, {retries, label})` -> results, errors: both keyed like `list`.
    fn cells(&self, lua: &Lua, list: Table, f: Function, opts: Value) -> mlua::Result<(Table, Table)> {
        let mut o = Opts::new("run:cells", opts)?;
        let retries: usize = o.get_or(lua, "retries", 1)?;
        let label: String = o.get_or(lua, "label", "cells".to_string())?;
        o.finish()?;
        let mut entries = Vec::new();
        for (slot, item) in list_items(&list)? {
            let at = match &slot {
                Value::Integer(i) => format!("run:cells: item {i}"),
                other => format!("run:cells: item '{}'", other.to_string().unwrap_or_default()),
            };
            let Value::Table(t) = &item else {
                return Err(mlua::Error::runtime(format!("{at} must be a table with a name and a key")));
            };
            let name: String = match t.get::<Value>("name")? {
                Value::String(s) => s.to_str()?.to_string(),
                _ => return Err(mlua::Error::runtime(format!("{at} has no name (a string)"))),
            };
            let key: Value = t.get("key")?;
            if key.is_nil() {
                return Err(mlua::Error::runtime(format!("{at} ({name}) has no key")));
            }
            entries.push(self.entry(lua, slot, name, key, item.clone(), "run:cells")?);
        }
        let mut seen = std::collections::HashSet::new();
        for e in &entries {
            if !seen.insert(e.dir.clone()) {
                return Err(mlua::Error::runtime(format!(
                    "run:cells: two items are the same cell ({} with the same key); give each its own name or key",
                    e.name
                )));
            }
        }
        let outcomes = self.run_group(lua, &entries, &f, retries, &label)?;
        let results = lua.create_table()?;
        let errors = lua.create_table()?;
        for (e, outcome) in entries.iter().zip(outcomes) {
            match outcome {
                Outcome::Result(v, _) => results.set(e.slot.clone(), from_json(lua, &v)?)?,
                Outcome::Failed(err) => errors.set(e.slot.clone(), err)?,
            }
        }
        Ok((results, errors))
    }
}

/// A list's items with their keys: 1..n for a sequence, else every key (sorted as strings).
fn list_items(list: &Table) -> mlua::Result<Vec<(Value, Value)>> {
    let n = list.raw_len();
    let mut items: Vec<(Value, Value)> = list.pairs::<Value, Value>().collect::<mlua::Result<_>>()?;
    if n > 0 && items.len() == n {
        return (1..=n).map(|i| Ok((Value::Integer(i as i64), list.raw_get(i)?))).collect();
    }
    items.sort_by_key(|(k, _)| k.to_string().unwrap_or_default());
    Ok(items)
}

fn check_interrupt() -> mlua::Result<()> {
    interrupt::check().map_err(stopped)
}

fn stopped(e: interrupt::Interrupted) -> mlua::Error {
    mlua::Error::runtime(format!("{e} while {}", describe_activity()))
}

fn describe_activity() -> String {
    match interrupt::activity() {
        a if a.is_empty() => "running the script".into(),
        a => a,
    }
}

impl UserData for LuaRun {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method("__tostring", |_, this, ()| Ok(format!("Run({})", this.0.dir.display())));
        methods.add_method("dir", |_, this, ()| Ok(this.0.dir.display().to_string()));
        methods.add_method("cell", |lua, this, (name, key, f, opts): (String, Value, Function, Value)| {
            this.cell(lua, name, key, f, opts)
        });
        methods
            .add_method("cells", |lua, this, (list, f, opts): (Table, Function, Value)| this.cells(lua, list, f, opts));
        methods.add_method("cell_dir", |lua, this, (name, key): (String, Value)| {
            let e = this.entry(lua, Value::Nil, name, key, Value::Nil, "run:cell_dir")?;
            Ok(e.dir.display().to_string())
        });
        methods.add_method("worker", |lua, _, ()| {
            let me = cells::identity();
            let t = lua.create_table()?;
            t.set("host", me.host.clone())?;
            t.set("pid", me.pid)?;
            t.set("job", me.job.clone())?;
            t.set("worker", me.worker.clone())?;
            t.set("launch", me.launch.clone())?;
            Ok(t)
        });
        methods.add_method("summary", |lua, this, ()| {
            let t = this.0.tally.borrow();
            let out = lua.create_table()?;
            out.set("done", t.done.len())?;
            out.set("skipped", t.skipped.len())?;
            let failed = lua.create_table()?;
            for (i, (n, e)) in t.failed.iter().enumerate() {
                let f = lua.create_table()?;
                f.set("name", n.clone())?;
                f.set("error", e.clone())?;
                failed.raw_set(i + 1, f)?;
            }
            out.set("failed", failed)?;
            out.set("seconds", this.0.started.elapsed().as_secs_f64())?;
            out.set("dir", this.0.dir.display().to_string())?;
            Ok(out)
        });
    }
}
