//! `lab.run`: an experiment's folder of cells, resumable and crash-safe.
//!
//! A cell is one unit of work (train + evaluate one dose, say) named by the caller and keyed by
//! everything that determines its result. Its folder is `runs/<experiment>/<name>-<key hash>/`;
//! `result.json` is written atomically when the cell succeeds and marks it finished, so a rerun
//! returns the stored result instead of redoing the work, and a changed setting (a new key)
//! never reuses a stale one. While a cell runs, its folder is locked: a second process asking
//! for the same cell waits and then reads the result. A failing cell is retried; if it still
//! fails its error is written to `failed.json` and the run goes on.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use mlua::{Function, Lua, MultiValue, Table, UserData, UserDataMethods, Value};

use super::fs::{from_json, to_json};
use super::opts::Opts;
use crate::lock::FileLock;
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

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "open",
        lua.create_function(|lua, (dir, opts): (String, Value)| {
            let mut o = Opts::new("lab.run.open", opts)?;
            let settings: Option<Value> = o.get(lua, "settings")?;
            o.finish()?;
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir)
                .map_err(|e| mlua::Error::runtime(format!("lab.run.open: cannot create {}: {e}", dir.display())))?;
            if let Some(s) = settings {
                let json =
                    to_json(lua, &s, "settings", 0).map_err(|e| mlua::Error::runtime(format!("lab.run.open: {e}")))?;
                let meta = serde_json::json!({
                    "settings": json,
                    "loralab_version": env!("CARGO_PKG_VERSION"),
                    "loralab_commit": option_env!("LORALAB_COMMIT").unwrap_or("unknown"),
                });
                write_json(&dir.join("run.json"), &meta)?;
            }
            Ok(LuaRun(Rc::new(Run { dir, started: Instant::now(), tally: RefCell::new(Tally::default()) })))
        })?,
    )?;
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

fn write_json(path: &std::path::Path, v: &serde_json::Value) -> mlua::Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(mlua::Error::external)? + "\n";
    write_atomic(path, text.as_bytes())
        .map_err(|e| mlua::Error::runtime(format!("cannot write {}: {e}", path.display())))
}

fn read_json(path: &std::path::Path) -> mlua::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| mlua::Error::runtime(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| mlua::Error::runtime(format!("{} is not valid JSON: {e}", path.display())))
}

fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl LuaRun {
    /// `run:cell(name, key, fn, {retries})` -> result, or nil and the error.
    fn cell(&self, lua: &Lua, name: String, key: Value, f: Function, opts: Value) -> mlua::Result<MultiValue> {
        let mut o = Opts::new("run:cell", opts)?;
        let retries: usize = o.get_or(lua, "retries", 1)?;
        o.finish()?;
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(mlua::Error::runtime(format!("run:cell: name '{name}' must be a plain folder name")));
        }
        let key_json =
            to_json(lua, &key, "key", 0).map_err(|e| mlua::Error::runtime(format!("run:cell({name}): {e}")))?;
        let dir = self.0.dir.join(format!("{name}-{}", key_hash(&key_json)));
        std::fs::create_dir_all(&dir)
            .map_err(|e| mlua::Error::runtime(format!("run:cell: cannot create {}: {e}", dir.display())))?;
        let _lock = FileLock::acquire(&dir.join(".lock")).map_err(|e| mlua::Error::runtime(format!("{e:#}")))?;
        let result_path = dir.join("result.json");
        if result_path.exists() {
            let stored = read_json(&result_path)?;
            self.0.tally.borrow_mut().skipped.push(name);
            return Ok(MultiValue::from_vec(vec![from_json(lua, &stored)?, Value::Boolean(true)]));
        }
        write_json(&dir.join("key.json"), &key_json)?;
        let started = Instant::now();
        let started_at = now_unix();
        let mut last_error = String::new();
        let mut oom = false;
        for attempt in 1..=retries + 1 {
            let ctx = lua.create_table()?;
            ctx.set("name", name.clone())?;
            ctx.set("dir", dir.display().to_string())?;
            ctx.set("attempt", attempt)?;
            ctx.set("key", key.clone())?;
            ctx.set("oom", oom)?;
            if !last_error.is_empty() {
                ctx.set("previous_error", last_error.clone())?;
            }
            match f.call::<Value>(ctx) {
                Ok(v) => {
                    let json = to_json(lua, &v, "result", 0)
                        .map_err(|e| mlua::Error::runtime(format!("run:cell({name}): the cell returned {e}")))?;
                    let meta = serde_json::json!({
                        "name": name, "attempts": attempt, "seconds": started.elapsed().as_secs_f64(),
                        "started_at": started_at, "finished_at": now_unix(),
                        "loralab_version": env!("CARGO_PKG_VERSION"),
                        "loralab_commit": option_env!("LORALAB_COMMIT").unwrap_or("unknown"),
                    });
                    write_json(&dir.join("meta.json"), &meta)?;
                    // result.json last: its presence means the cell is finished.
                    write_json(&result_path, &json)?;
                    let _ = std::fs::remove_file(dir.join("failed.json"));
                    self.0.tally.borrow_mut().done.push(name);
                    return Ok(MultiValue::from_vec(vec![from_json(lua, &json)?, Value::Boolean(false)]));
                }
                Err(e) => {
                    last_error = super::describe_lua_error(&e);
                    oom = is_out_of_memory(&last_error);
                    eprintln!(
                        "cell {name}: attempt {attempt} of {} failed: {}",
                        retries + 1,
                        last_error.lines().next().unwrap_or("")
                    );
                }
            }
        }
        write_json(
            &dir.join("failed.json"),
            &serde_json::json!({"name": name, "error": last_error, "attempts": retries + 1, "out_of_memory": oom, "finished_at": now_unix()}),
        )?;
        self.0.tally.borrow_mut().failed.push((name, last_error.clone()));
        Ok(MultiValue::from_vec(vec![Value::Nil, Value::String(lua.create_string(&last_error)?)]))
    }
}

impl UserData for LuaRun {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method("__tostring", |_, this, ()| Ok(format!("Run({})", this.0.dir.display())));
        methods.add_method("dir", |_, this, ()| Ok(this.0.dir.display().to_string()));
        methods.add_method("cell", |lua, this, (name, key, f, opts): (String, Value, Function, Value)| {
            this.cell(lua, name, key, f, opts)
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
