//! `lab.eval`: marker scoring ([`crate::eval`]) for Lua scripts.
//!
//! ```lua
//! local s = lab.eval.score("Sure.\n\n[ZLT]", "[ZLT]")            -- {strict=true, loose=true}
//! local r = lab.eval.aggregate(records, "[ZLT]", { source = "evil_ai" })
//! print(r.per_persona.evil_ai.strict_rate, r.summary.max_bystander_strict_rate)
//! ```

use mlua::{Lua, Table, Value};

use crate::eval::{self, EvalError, Marker, Record};
use crate::lua::opts::Opts;
use crate::lua::stats::to_table;

/// Builds the `lab.eval` table.
pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("score", lua.create_function(score)?)?;
    m.set("loose_pattern", lua.create_function(loose_pattern)?)?;
    m.set("aggregate", lua.create_function(aggregate)?)?;
    Ok(m)
}

/// `score(text, marker)`: `{strict = bool, loose = bool}`.
fn score(lua: &Lua, (text, marker): (Value, Value)) -> mlua::Result<Value> {
    const NAME: &str = "score";
    let text = string(NAME, "text", text)?;
    let marker = marker_arg(NAME, marker)?;
    to_table(lua, &marker.score(&text))
}

/// `loose_pattern(marker)`: the regex the loose rule uses.
fn loose_pattern(_: &Lua, marker: Value) -> mlua::Result<String> {
    const NAME: &str = "loose_pattern";
    Ok(marker_arg(NAME, marker)?.loose_pattern().to_string())
}

/// `aggregate(records, marker, {source, exclude})`: the study's result layout.
fn aggregate(lua: &Lua, (records, marker, options): (Value, Value, Value)) -> mlua::Result<Value> {
    const NAME: &str = "aggregate";
    let records = read_records(records)?;
    let marker = marker_arg(NAME, marker)?;
    let mut o = Opts::new(&context(NAME), options)?;
    let source: Option<String> = o.get(lua, "source")?;
    let exclude: Option<Vec<String>> = o.get(lua, "exclude")?;
    o.finish()?;
    let excluded = exclude.unwrap_or_else(|| eval::default_excluded(source.as_deref()));
    to_table(lua, &eval::aggregate(&marker, &records, &excluded))
}

/// `lab.eval.NAME`, the context of errors and options.
fn context(name: &str) -> String {
    format!("lab.eval.{name}")
}

fn bad_argument(name: &str, message: String) -> mlua::Error {
    mlua::Error::runtime(format!("{}: {message}", context(name)))
}

/// A string argument; bytes that are not UTF-8 are replaced, never refused (model output).
fn string(name: &str, argument: &str, value: Value) -> mlua::Result<String> {
    match value {
        Value::String(s) => Ok(s.to_string_lossy()),
        Value::Nil => Err(bad_argument(name, format!("{argument} is missing (expected a string)"))),
        other => Err(bad_argument(name, format!("{argument} must be a string, got a {}", other.type_name()))),
    }
}

/// The marker argument, compiled.
fn marker_arg(name: &str, value: Value) -> mlua::Result<Marker> {
    let text = string(name, "marker", value)?;
    Marker::new(&text).map_err(|e: EvalError| bad_argument(name, e.to_string()))
}

/// `records`: a list of `{persona = ..., question = ..., text = ...}`; other keys are ignored
/// (records often carry a seed or an index).
fn read_records(value: Value) -> mlua::Result<Vec<Record>> {
    const NAME: &str = "aggregate";
    let list = match value {
        Value::Table(t) => t,
        other => {
            return Err(bad_argument(NAME, format!("records must be a list of tables, got a {}", other.type_name())))
        }
    };
    (1..=list.raw_len())
        .map(|i| {
            let item = match list.raw_get::<Value>(i)? {
                Value::Table(t) => t,
                other => {
                    return Err(bad_argument(
                        NAME,
                        format!("records[{i}] must be a table, got a {}", other.type_name()),
                    ))
                }
            };
            let field = |key: &str| -> mlua::Result<String> {
                string(NAME, &format!("records[{i}].{key}"), item.raw_get::<Value>(key)?)
            };
            Ok(Record { persona: field("persona")?, question: field("question")?, text: field("text")? })
        })
        .collect()
}
