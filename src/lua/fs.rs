//! `lab.fs`: the files a script writes (reports, tables, results) and reads back.
//!
//! Every write goes through [`crate::store::write_atomic`], so a run killed mid-write leaves the
//! previous file, never half of a new one, and parent folders are created on the way.
//!
//! JSON mapping: a table whose keys are exactly 1..n is a list, any other table an object whose
//! keys are written sorted (integer keys as strings), so that reruns give identical files. An
//! empty table is written as `[]`; lists read by `read_json` keep being lists. JSON `null` reads
//! as `nil` in an object and as `lab.fs.null` in a list (a hole would end the list), and
//! `lab.fs.null` writes as `null`. NaN and infinities have no JSON form and are an error that
//! names where they are.

use std::collections::BTreeMap;
use std::path::Path;

use mlua::{Lua, LuaSerdeExt, Table, Value};
use serde_json::Value as Json;

use super::opts::Opts;
use crate::store::write_atomic;

/// Deeper than any results table; stops a table that contains itself.
const MAX_DEPTH: usize = 100;

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("null", lua.null())?;
    m.set(
        "write_text",
        lua.create_function(|_, (path, text): (String, mlua::LuaString)| write(&path, "write_text", &text.as_bytes()))?,
    )?;
    m.set(
        "read_text",
        lua.create_function(|lua, path: String| {
            let bytes = std::fs::read(&path).map_err(|e| io_error("read_text", &path, e))?;
            lua.create_string(bytes)
        })?,
    )?;
    m.set("write_json", lua.create_function(write_json)?)?;
    m.set("read_json", lua.create_function(read_json)?)?;
    m.set("exists", lua.create_function(|_, path: String| Ok(Path::new(&path).exists()))?)?;
    m.set(
        "mkdir",
        lua.create_function(|_, path: String| std::fs::create_dir_all(&path).map_err(|e| io_error("mkdir", &path, e)))?,
    )?;
    m.set("write_csv", lua.create_function(write_csv)?)?;
    Ok(m)
}

fn io_error(func: &str, path: &str, e: std::io::Error) -> mlua::Error {
    mlua::Error::runtime(format!("lab.fs.{func}({path}): {e}"))
}

fn write(path: &str, func: &str, bytes: &[u8]) -> mlua::Result<()> {
    write_atomic(Path::new(path), bytes).map_err(|e| io_error(func, path, e))
}

/// `lab.fs.write_json(path, value, {pretty = true})`.
fn write_json(lua: &Lua, (path, value, opts): (String, Value, Value)) -> mlua::Result<()> {
    let mut o = Opts::new("lab.fs.write_json", opts)?;
    let pretty: bool = o.get_or(lua, "pretty", true)?;
    o.finish()?;
    let json = to_json(lua, &value, "value", 0)
        .map_err(|e| mlua::Error::runtime(format!("lab.fs.write_json({path}): {e}")))?;
    let mut text = if pretty { serde_json::to_string_pretty(&json) } else { serde_json::to_string(&json) }
        .map_err(|e| mlua::Error::runtime(format!("lab.fs.write_json({path}): {e}")))?;
    text.push('\n');
    write(&path, "write_json", text.as_bytes())
}

/// `lab.fs.read_json(path)`.
fn read_json(lua: &Lua, path: String) -> mlua::Result<Value> {
    let text = std::fs::read_to_string(&path).map_err(|e| io_error("read_json", &path, e))?;
    let json: Json = serde_json::from_str(&text)
        .map_err(|e| mlua::Error::runtime(format!("lab.fs.read_json({path}): not valid JSON: {e}")))?;
    from_json(lua, &json)
}

/// Lua -> JSON; `at` names the place for error messages (`value.cells[3].p`).
pub fn to_json(lua: &Lua, value: &Value, at: &str, depth: usize) -> Result<Json, String> {
    match value {
        Value::Nil => Ok(Json::Null),
        Value::Boolean(b) => Ok(Json::Bool(*b)),
        Value::Integer(i) => Ok(Json::from(*i)),
        Value::Number(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .ok_or_else(|| format!("{at} is {f}, which JSON cannot hold")),
        Value::String(s) => {
            s.to_str().map(|s| Json::String(s.to_string())).map_err(|_| format!("{at} is a string that is not UTF-8"))
        }
        Value::LightUserData(_) if *value == lua.null() => Ok(Json::Null),
        Value::Table(t) => table_to_json(lua, t, at, depth),
        other => Err(format!("{at} is {}, which JSON cannot hold", crate::lua::a_type(other.type_name()))),
    }
}

fn table_to_json(lua: &Lua, t: &Table, at: &str, depth: usize) -> Result<Json, String> {
    if depth >= MAX_DEPTH {
        return Err(format!("{at} is nested more than {MAX_DEPTH} deep (a table that contains itself?)"));
    }
    let err = |e: mlua::Error| format!("{at}: {e}");
    let pairs: Vec<(Value, Value)> = t.pairs::<Value, Value>().collect::<mlua::Result<_>>().map_err(err)?;
    let len = t.raw_len();
    let is_list = t.metatable().is_some_and(|m| m == lua.array_metatable()) || pairs.len() == len;
    if is_list {
        let items = (1..=len)
            .map(|i| to_json(lua, &t.raw_get(i).map_err(err)?, &format!("{at}[{i}]"), depth + 1))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Json::Array(items));
    }
    let mut sorted = BTreeMap::new();
    for (k, v) in pairs {
        let key = match &k {
            Value::String(s) => s.to_str().map_err(|_| format!("{at} has a key that is not UTF-8"))?.to_string(),
            Value::Integer(i) => i.to_string(),
            other => {
                return Err(format!(
                    "{at} has {} key; JSON keys are names or integers",
                    crate::lua::a_type(other.type_name())
                ))
            }
        };
        let child = to_json(lua, &v, &format!("{at}.{key}"), depth + 1)?;
        sorted.insert(key, child);
    }
    // Inserted in sorted order, so the output is sorted whether or not serde_json keeps order.
    Ok(Json::Object(sorted.into_iter().collect()))
}

/// JSON -> Lua: lists get mlua's array metatable so they are written back as lists.
pub fn from_json(lua: &Lua, json: &Json) -> mlua::Result<Value> {
    Ok(match json {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(lua.create_string(s)?),
        Json::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                let v = match item {
                    Json::Null => lua.null(),
                    other => from_json(lua, other)?,
                };
                t.raw_set(i + 1, v)?;
            }
            t.set_metatable(Some(lua.array_metatable()))?;
            Value::Table(t)
        }
        Json::Object(map) => {
            let t = lua.create_table_with_capacity(0, map.len())?;
            for (k, v) in map {
                t.raw_set(k.as_str(), from_json(lua, v)?)?;
            }
            Value::Table(t)
        }
    })
}

/// `lab.fs.write_csv(path, header, rows)`: each row a list in header order, or a table keyed
/// by header names (missing keys give empty cells, unknown keys are an error).
fn write_csv(lua: &Lua, (path, header, rows): (String, Vec<String>, Table)) -> mlua::Result<()> {
    let fail = |msg: String| mlua::Error::runtime(format!("lab.fs.write_csv({path}): {msg}"));
    if header.is_empty() {
        return Err(fail("the header is empty".into()));
    }
    let mut out = csv_line(&header.iter().map(|h| csv_field(h)).collect::<Vec<_>>());
    for (i, row) in rows.sequence_values::<Value>().enumerate() {
        let cells = csv_row(lua, &header, row?, i + 1).map_err(fail)?;
        out.push_str(&csv_line(&cells));
    }
    write(&path, "write_csv", out.as_bytes())
}

fn csv_line(cells: &[String]) -> String {
    let mut line = cells.join(",");
    line.push('\n');
    line
}

fn csv_row(lua: &Lua, header: &[String], row: Value, n: usize) -> Result<Vec<String>, String> {
    let Value::Table(t) = row else {
        return Err(format!("row {n} is {}, not a table", crate::lua::a_type(row.type_name())));
    };
    let positional = t.raw_len();
    if positional > 0 {
        if positional != header.len() {
            return Err(format!("row {n} has {positional} values but the header has {}", header.len()));
        }
        return (1..=positional)
            .map(|i| csv_cell(lua, &t.raw_get(i).map_err(|e| e.to_string())?, n, &header[i - 1]))
            .collect();
    }
    for pair in t.pairs::<Value, Value>() {
        let (k, _) = pair.map_err(|e| e.to_string())?;
        let known = matches!(&k, Value::String(s) if header.iter().any(|h| s.to_str().is_ok_and(|s| *s == **h)));
        if !known {
            let key = k.to_string().unwrap_or_else(|_| format!("{k:?}"));
            return Err(format!("row {n} has key '{key}', which is not in the header ({})", header.join(", ")));
        }
    }
    header.iter().map(|h| csv_cell(lua, &t.raw_get(h.as_str()).map_err(|e| e.to_string())?, n, h)).collect()
}

/// One cell: numbers in their shortest exact form, strings quoted when they need it.
fn csv_cell(lua: &Lua, v: &Value, row: usize, column: &str) -> Result<String, String> {
    Ok(match v {
        Value::Nil => String::new(),
        Value::LightUserData(_) if *v == lua.null() => String::new(),
        Value::Boolean(b) => b.to_string(),
        Value::Integer(i) => i.to_string(),
        // Debug, not Display: 3.3e-19 rather than nineteen zeros, and still exact.
        Value::Number(f) => format!("{f:?}"),
        Value::String(s) => csv_field(&s.to_str().map_err(|_| format!("row {row}, column {column}: not UTF-8"))?),
        other => {
            return Err(format!(
                "row {row}, column {column} is {}; cells are numbers, strings or booleans",
                crate::lua::a_type(other.type_name())
            ))
        }
    })
}

/// RFC 4180 quoting: only fields with a comma, quote or line break are quoted.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
