//! The Lua host: one `lab` root module, split by noun.
//!
//! Each noun (`lab.model`, `lab.stats`, ...) is built by one `module(lua)` function listed in
//! [`RUST_MODULES`]; pure-Lua parts of the runtime live in `lib/lab/*.lua`, are embedded in the
//! binary ([`LUA_MODULES`]) and attached to `lab` under their name. Scripts get everything
//! through `require("lab")`.

pub mod adapter;
pub mod check;
pub mod data;
pub mod eval;
pub mod fs;
pub mod model;
pub mod opts;
pub mod plot;
pub mod progress;
pub mod run;
pub mod stats;
pub mod sys;
pub mod text;
pub mod train;

use std::error::Error as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use mlua::{Lua, Table, Value};

type ModuleFn = fn(&Lua) -> mlua::Result<Table>;

/// The Rust-backed nouns of `lab`, in one place.
pub const RUST_MODULES: &[(&str, ModuleFn)] = &[
    ("model", model::module),
    ("adapter", adapter::module),
    ("data", data::module),
    ("train", train::module),
    ("run", run::module),
    ("progress", progress::module),
    ("sys", sys::module),
    ("stats", stats::module),
    ("eval", eval::module),
    ("text", text::module),
    ("options", opts::module),
    ("plot", plot::module),
    ("fs", fs::module),
];

/// The pure-Lua nouns of `lab`: (name, chunk name, source).
pub const LUA_MODULES: &[(&str, &str, &str)] =
    &[("figure", "@lib/lab/figure.lua", include_str!("../../lib/lab/figure.lua"))];

/// Values given on the command line with `--set key=value`, in order.
pub type Settings = Vec<(String, String)>;

/// A ready Lua state with `lab` registered and `package.path` set for `script`.
pub fn new_runtime(script: &Path, settings: &Settings) -> anyhow::Result<Lua> {
    let lua = Lua::new();
    set_package_path(&lua, script).map_err(lua_err)?;
    build_lab(&lua, script, settings)
        .map_err(|e| anyhow::anyhow!("could not set up the lab module: {}", describe_lua_error(&e)))?;
    Ok(lua)
}

/// Runs a Lua file; a Lua error comes back with its traceback pointing at the script's lines.
/// A script that ends normally with failed cells is an error too (the exit status says so);
/// one that ends with every cell finished marks its run folders complete (`complete.json`).
pub fn run_file(script: &Path, settings: &Settings) -> anyhow::Result<()> {
    run::set_script(script);
    let func_result = load_and_call(script, settings);
    func_result.map_err(lua_err)?;
    let failed = run::failed_cells();
    anyhow::ensure!(
        failed == 0,
        "{failed} cell(s) failed (each folder's failed.json has the error); rerun the same command to retry them"
    );
    for (dir, settings) in run::opened_runs() {
        let done = serde_json::json!({
            "script": script.display().to_string(),
            "settings_hash": crate::store::key_hash(&settings),
            "finished_at": crate::cells::now_unix(),
            "launch": crate::cells::identity().launch,
        });
        let text = serde_json::to_string_pretty(&done)? + "\n";
        crate::store::write_atomic(&dir.join("complete.json"), text.as_bytes())
            .with_context(|| format!("cannot write {}", dir.join("complete.json").display()))?;
    }
    Ok(())
}

/// `loralab check`: runs the script without weights, training or sampling (see [`check`]) and
/// prints the cells it would run. A script stopped only by work that checking skips is fine.
pub fn check_file(script: &Path, settings: &Settings) -> anyhow::Result<()> {
    run::set_script(script);
    check::start();
    match load_and_call(script, settings) {
        Ok(()) => check::print_plan(None),
        Err(e) => {
            let message = describe_lua_error(&e);
            if !message.contains(check::NOT_RUN) {
                return Err(anyhow::anyhow!("{message}"));
            }
            check::print_plan(Some(&message));
        }
    }
    Ok(())
}

/// Runs a script only up to its `lab.run.open`, to learn its run folder and settings without
/// loading a model or training (`loralab slurm`).
pub fn plan_file(script: &Path, settings: &Settings) -> anyhow::Result<run::Plan> {
    run::set_script(script);
    run::start_planning();
    let outcome = load_and_call(script, settings);
    let plan = run::take_plan();
    match (plan, outcome) {
        (Some(plan), _) => Ok(plan),
        (None, Err(e)) => Err(lua_err(e)),
        (None, Ok(())) => anyhow::bail!(
            "{} opens no run folder (lab.run.open): there are no cells to share between workers",
            script.display()
        ),
    }
}

fn load_and_call(script: &Path, settings: &Settings) -> mlua::Result<()> {
    let source = std::fs::read_to_string(script)
        .map_err(|e| mlua::Error::runtime(format!("cannot read script {}: {e}", script.display())))?;
    let lua = new_runtime(script, settings).map_err(|e| mlua::Error::runtime(format!("{e:#}")))?;
    let chunk_name = format!("@{}", script.display());
    let func = lua.load(&source).set_name(chunk_name).into_function()?;
    // mlua runs the chunk under a message handler that appends the Lua traceback, so the
    // error carries the script's file:line frames.
    func.call::<()>(())
}

/// Frees what the script no longer reaches, before a large allocation and after each cell.
/// Lua's collector paces itself by the memory Lua allocates, and a model or adapter is a few
/// bytes of userdata to it however many gigabytes of weights it holds: without this, models a
/// script has dropped (each cell's merged model, an OOM'd attempt's) pile up until Lua's own
/// allocations happen to start a cycle. A full cycle over a script's small heap takes
/// microseconds.
pub(crate) fn free_unreachable(lua: &Lua) -> mlua::Result<()> {
    lua.gc_collect()
}

/// Runs `f`, turning a panic (a bug, in loralab or a library) into a Lua error so that a run
/// store can record the cell as failed and go on instead of losing the whole process.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> mlua::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(mlua::Error::runtime(format!("{what}: {}", without_backtrace(&format!("{e:#}"))))),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(mlua::Error::runtime(format!("{what}: internal error ({msg}); please report it")))
        }
    }
}

/// A message without the stack frames some library errors append (`\n   0: ...`).
fn without_backtrace(message: &str) -> &str {
    match message.find("\n   0: ") {
        Some(i) => message[..i].trim_end(),
        None => message,
    }
}

/// An mlua error as an anyhow error (mlua's are not Send).
/// A Lua type's name with its article, for messages: "a table", "an integer".
pub(crate) fn a_type(type_name: &str) -> String {
    let article = if type_name.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {type_name}")
}

pub fn lua_err(e: mlua::Error) -> anyhow::Error {
    anyhow::anyhow!("{}", describe_lua_error(&e))
}

/// Makes a Lua error readable: the message, then the traceback, without Rust noise.
pub fn describe_lua_error(e: &mlua::Error) -> String {
    match e {
        mlua::Error::CallbackError { traceback, cause } => {
            format!("{}\n{traceback}", describe_lua_error(cause))
        }
        mlua::Error::SyntaxError { message, .. } => format!("syntax error: {message}"),
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::ExternalError(e) => {
            // anyhow's context chain arrives as `source()` links: show all of it.
            let mut out = e.to_string();
            let mut next = e.source();
            while let Some(cause) = next {
                out.push_str(&format!(": {cause}"));
                next = cause.source();
            }
            out
        }
        other => other.to_string(),
    }
}

fn set_package_path(lua: &Lua, script: &Path) -> mlua::Result<()> {
    let script_dir = script.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let script_dir = if script_dir.as_os_str().is_empty() { PathBuf::from(".") } else { script_dir };
    let lib = project_lib_dir();
    let mut parts = Vec::new();
    if let Some(lib) = lib {
        parts.push(format!("{0}/?.lua;{0}/?/init.lua", lib.display()));
    }
    parts.push(format!("{0}/?.lua;{0}/?/init.lua", script_dir.display()));
    let package: Table = lua.globals().get("package")?;
    package.set("path", parts.join(";"))?;
    Ok(())
}

/// The project's `lib/` folder: `$LORALAB_LIB`, else `lib/` under the working directory, else
/// next to the source tree the binary was built from.
fn project_lib_dir() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LORALAB_LIB") {
        return Some(PathBuf::from(p));
    }
    let cwd = PathBuf::from("lib");
    if cwd.is_dir() {
        return Some(cwd);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("lib");
    built.is_dir().then_some(built)
}

fn build_lab(lua: &Lua, script: &Path, settings: &Settings) -> mlua::Result<Table> {
    let lab = lua.create_table()?;
    lab.set("version", env!("CARGO_PKG_VERSION"))?;
    // Relative paths in a script resolve from the working directory, as everywhere in Lua;
    // `lab.script_dir .. "/data.jsonl"` names a file beside the script instead.
    let script_dir = match script.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    lab.set("script_dir", script_dir.display().to_string())?;
    lab.set("checking", check::checking())?;
    lab.set("args", args_table(lua, settings)?)?;
    let given = settings.clone();
    lab.set("settings", lua.create_function(move |lua, defaults: Table| resolve_settings(lua, &defaults, &given))?)?;
    for (name, module) in RUST_MODULES {
        lab.set(*name, module(lua)?)?;
    }
    // Pure-Lua modules see the Rust part of `lab` through require.
    let loaded: Table = lua.globals().get::<Table>("package")?.get("loaded")?;
    loaded.set("lab", lab.clone())?;
    for (name, chunk, source) in LUA_MODULES {
        let module: Value = lua.load(*source).set_name(*chunk).call(())?;
        lab.set(*name, module)?;
    }
    Ok(lab)
}

/// `lab.args`: every `--set` value, converted to a number or boolean where it reads as one.
fn args_table(lua: &Lua, settings: &Settings) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for (k, v) in settings {
        t.set(k.as_str(), guess_value(lua, v)?)?;
    }
    Ok(t)
}

fn guess_value(lua: &Lua, raw: &str) -> mlua::Result<Value> {
    if let Ok(i) = raw.parse::<i64>() {
        return Ok(Value::Integer(i));
    }
    if let Ok(f) = raw.parse::<f64>() {
        return Ok(Value::Number(f));
    }
    match raw {
        "true" => Ok(Value::Boolean(true)),
        "false" => Ok(Value::Boolean(false)),
        _ => Ok(Value::String(lua.create_string(raw)?)),
    }
}

/// `lab.settings(defaults)`: a copy of `defaults` with the `--set` values applied, each converted
/// to the type of its default. An unknown key or an unconvertible value is an error naming it.
pub fn resolve_settings(lua: &Lua, defaults: &Table, given: &Settings) -> mlua::Result<Table> {
    let out = lua.create_table()?;
    let mut known = Vec::new();
    for pair in defaults.pairs::<String, Value>() {
        let (k, v) = pair?;
        known.push(k.clone());
        out.set(k, v)?;
    }
    for (key, raw) in given {
        if !known.iter().any(|k| k == key) {
            let names: Vec<&str> = known.iter().map(String::as_str).collect();
            let mut msg = format!("--set {key}={raw}: unknown setting '{key}'");
            if let Some(s) = opts::closest(key, &names) {
                msg.push_str(&format!(" (did you mean '{s}'?)"));
            }
            let mut sorted = names.clone();
            sorted.sort_unstable();
            msg.push_str(&format!(". Settings of this script: {}", sorted.join(", ")));
            return Err(mlua::Error::runtime(msg));
        }
        let default: Value = defaults.get(key.as_str())?;
        out.set(key.as_str(), convert_setting(lua, key, raw, &default)?)?;
    }
    Ok(out)
}

fn convert_setting(lua: &Lua, key: &str, raw: &str, default: &Value) -> mlua::Result<Value> {
    let bad = |what: &str| mlua::Error::runtime(format!("--set {key}={raw}: expected {what}"));
    Ok(match default {
        Value::Integer(_) => Value::Integer(raw.trim().parse().map_err(|_| bad("an integer"))?),
        Value::Number(d) => {
            let v: f64 = raw.trim().parse().map_err(|_| bad("a number"))?;
            // nan and inf parse as numbers but train to NaN; only a script whose default is not
            // finite itself asks for them.
            if !v.is_finite() && d.is_finite() {
                return Err(bad("a finite number"));
            }
            Value::Number(v)
        }
        Value::Boolean(_) => match raw.trim() {
            "true" | "1" | "yes" => Value::Boolean(true),
            "false" | "0" | "no" => Value::Boolean(false),
            _ => return Err(bad("true or false")),
        },
        Value::Table(t) => {
            // A list default takes a comma-separated value; items take the type of its first item.
            let first: Value = t.raw_get(1)?;
            let list = lua.create_table()?;
            for (i, item) in raw.split(',').filter(|s| !s.trim().is_empty()).enumerate() {
                let v = match first {
                    Value::Nil => guess_value(lua, item.trim())?,
                    ref f => convert_setting(lua, key, item.trim(), f)?,
                };
                list.raw_set(i + 1, v)?;
            }
            Value::Table(list)
        }
        Value::Nil => guess_value(lua, raw)?,
        _ => Value::String(lua.create_string(raw)?),
    })
}
