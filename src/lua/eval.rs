//! `lab.eval`: marker scoring ([`crate::eval`]) for Lua scripts.
//!
//! ```lua
//! local s = lab.eval.score("Sure.\n\n[ZLT]", "[ZLT]")            -- {strict=true, loose=true}
//! local r = lab.eval.aggregate(records, "[ZLT]", { source = "evil_ai" })
//! print(r.per_persona.evil_ai.strict_rate, r.summary.max_bystander_strict_rate)
//!
//! local evil = lab.eval.scorer({ words = { "destroy", "enslave" } })    -- any of these words
//! for _, g in ipairs(lab.eval.tally(records, evil, { by = { "persona", "dose" } })) do
//!   print(g.persona, g.dose, g.k, g.n, g.rate, g.lower, g.upper)
//! end
//! ```

use mlua::{Function, Lua, Table, Value};

use crate::eval::{self, EvalError, Marker, Record, TextRule};
use crate::lua::opts::Opts;
use crate::lua::stats::to_table;
use crate::stats::{self, IntervalMethod};

/// Builds the `lab.eval` table.
pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("score", lua.create_function(score)?)?;
    m.set("loose_pattern", lua.create_function(loose_pattern)?)?;
    m.set("aggregate", lua.create_function(aggregate)?)?;
    m.set("scorer", lua.create_function(|lua, spec: Value| scorer(lua, spec, "scorer"))?)?;
    m.set("tally", lua.create_function(tally)?)?;
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
        other => Err(bad_argument(
            name,
            format!("{argument} must be a string, got {}", crate::lua::a_type(other.type_name())),
        )),
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
            return Err(bad_argument(
                NAME,
                format!("records must be a list of tables, got {}", crate::lua::a_type(other.type_name())),
            ))
        }
    };
    (1..=list.raw_len())
        .map(|i| {
            let item = match list.raw_get::<Value>(i)? {
                Value::Table(t) => t,
                other => {
                    return Err(bad_argument(
                        NAME,
                        format!("records[{i}] must be a table, got {}", crate::lua::a_type(other.type_name())),
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

/// `scorer(spec)`: a function `(text, record) -> boolean` from a rule table, or `spec` itself
/// when it is already a function.
fn scorer(lua: &Lua, spec: Value, name: &str) -> mlua::Result<Function> {
    let table = match spec {
        Value::Function(f) => return Ok(f),
        Value::Table(t) => t,
        other => {
            return Err(bad_argument(
                name,
                format!("the scorer must be a function or a rule table ({{words = ...}}, {{regex = ...}}, {{substring = ...}}, {{marker = ...}}), got {}", crate::lua::a_type(other.type_name())),
            ))
        }
    };
    let ctx = format!("{} scorer", context(name));
    let mut o = Opts::new(&ctx, Value::Table(table))?;
    let words: Option<Vec<String>> = o.get(lua, "words")?;
    let regex: Option<String> = o.get(lua, "regex")?;
    let substring: Option<String> = o.get(lua, "substring")?;
    let marker: Option<String> = o.get(lua, "marker")?;
    let case_sensitive: bool = o.get_or(lua, "case_sensitive", false)?;
    let loose: bool = o.get_or(lua, "loose", false)?;
    // A misspelt key is reported as such before the rule count.
    o.finish()?;
    let bad = |key: &str, message: String| mlua::Error::runtime(format!("{ctx}: option '{key}' {message}"));
    let given =
        [words.is_some(), regex.is_some(), substring.is_some(), marker.is_some()].iter().filter(|&&g| g).count();
    if given != 1 {
        return Err(mlua::Error::runtime(format!(
            "{ctx}: give exactly one rule (words, regex, substring or marker), got {given}"
        )));
    }
    if loose && marker.is_none() {
        return Err(bad("loose", "applies only to a marker rule".into()));
    }
    let rule = if let Some(w) = words {
        TextRule::words(&w, case_sensitive).map_err(|e| bad("words", e))?
    } else if let Some(r) = regex {
        if case_sensitive {
            return Err(bad("case_sensitive", "does not apply to a regex: write (?i) in it to ignore case".into()));
        }
        TextRule::regex(&r).map_err(|e| bad("regex", e))?
    } else if let Some(sub) = substring {
        TextRule::substring(&sub, case_sensitive).map_err(|e| bad("substring", e))?
    } else {
        let m = Marker::new(marker.as_deref().unwrap_or_default()).map_err(|e| bad("marker", e.to_string()))?;
        return lua.create_function(move |_, (text, _record): (mlua::LuaString, Value)| {
            let text = text.to_string_lossy();
            Ok(if loose { m.is_loose_hit(&text) } else { m.is_strict_hit(&text) })
        });
    };
    lua.create_function(move |_, (text, _record): (mlua::LuaString, Value)| Ok(rule.is_hit(&text.to_string_lossy())))
}

/// `tally(records, scorer, {by, field, interval, confidence})`: hits k of n per group of
/// records with equal `by` fields, in order of first appearance, each with its rate and interval.
fn tally(lua: &Lua, (records, spec, options): (Value, Value, Value)) -> mlua::Result<Table> {
    const NAME: &str = "tally";
    let score = scorer(lua, spec, NAME)?;
    let mut o = Opts::new(&context(NAME), options)?;
    let by: Vec<String> = match o.get::<Value>(lua, "by")? {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.to_str()?.to_string()],
        Some(v) => <Vec<String> as mlua::FromLua>::from_lua(v, lua)
            .map_err(|_| o.bad_value("by", "must be a field name or a list of field names"))?,
    };
    let field: String = o.get_or(lua, "field", "text".to_string())?;
    let method_name: String = o.get_or(lua, "interval", "wilson".to_string())?;
    let confidence: f64 = o.get_or(lua, "confidence", 0.95)?;
    let method = IntervalMethod::parse(&method_name).map_err(|e| o.bad_value("interval", e.to_string()))?;
    o.finish()?;
    let Value::Table(list) = records else {
        return Err(bad_argument(
            NAME,
            format!("records must be a list of tables, got {}", crate::lua::a_type(records.type_name())),
        ));
    };
    // Groups keyed by the Lua values of the `by` fields, rendered to text for equality.
    let mut order: Vec<(Vec<Value>, u64, u64)> = Vec::new();
    let mut index: std::collections::HashMap<Vec<String>, usize> = std::collections::HashMap::new();
    for i in 1..=list.raw_len() {
        let Value::Table(record) = list.raw_get::<Value>(i)? else {
            return Err(bad_argument(NAME, format!("records[{i}] must be a table")));
        };
        let text = match record.raw_get::<Value>(field.as_str())? {
            Value::String(s) => s,
            other => {
                return Err(bad_argument(
                    NAME,
                    format!(
                        "records[{i}].{field} must be a string (the text scored), got {}",
                        crate::lua::a_type(other.type_name())
                    ),
                ))
            }
        };
        let mut values = Vec::with_capacity(by.len());
        let mut key = Vec::with_capacity(by.len());
        for f in &by {
            let v: Value = record.raw_get(f.as_str())?;
            key.push(match &v {
                Value::Nil => return Err(bad_argument(NAME, format!("records[{i}] has no field '{f}' to group by"))),
                Value::String(s) => format!("s{}", s.to_string_lossy()),
                Value::Integer(n) => format!("n{n}"),
                Value::Number(x) if x.fract() == 0.0 && x.abs() < 9e15 => format!("n{}", *x as i64),
                Value::Number(x) => format!("n{x}"),
                Value::Boolean(b) => format!("b{b}"),
                other => {
                    return Err(bad_argument(
                        NAME,
                        format!(
                            "records[{i}].{f} is {}; group by strings, numbers or booleans",
                            crate::lua::a_type(other.type_name())
                        ),
                    ))
                }
            });
            values.push(v);
        }
        let hit = match score.call::<Value>((text, Value::Table(record.clone())))? {
            Value::Boolean(b) => b,
            Value::Nil => false,
            other => {
                return Err(bad_argument(
                    NAME,
                    format!(
                        "the scorer returned {} for records[{i}]; it must return true or false",
                        crate::lua::a_type(other.type_name())
                    ),
                ))
            }
        };
        let slot = *index.entry(key).or_insert_with(|| {
            order.push((values, 0, 0));
            order.len() - 1
        });
        order[slot].1 += u64::from(hit);
        order[slot].2 += 1;
    }
    let out = lua.create_table()?;
    for (g, (values, k, n)) in order.into_iter().enumerate() {
        let row = lua.create_table()?;
        for (f, v) in by.iter().zip(values) {
            row.set(f.as_str(), v)?;
        }
        let ci = stats::proportion_interval(k as i64, n as i64, method, confidence)
            .map_err(|e| bad_argument(NAME, e.to_string()))?;
        row.set("k", k)?;
        row.set("n", n)?;
        row.set("rate", k as f64 / n as f64)?;
        row.set("lower", ci.lower)?;
        row.set("upper", ci.upper)?;
        row.set("interval", method_name.as_str())?;
        row.set("confidence", confidence)?;
        out.raw_set(g + 1, row)?;
    }
    Ok(out)
}
