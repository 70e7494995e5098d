//! `lab.text`: regular expressions for Lua scripts, in Rust's `regex` syntax (alternation,
//! classes, `\b`, `(?i)`; no look-around or back-references), which Lua patterns lack.
//!
//! ```lua
//! local i, j = lab.text.find("I will destroy you", [[\b(destroy|harm)\b]])   -- 8, 14
//! print(lab.text.match("score: 42", [[(\d+)]]))                                 -- 42
//! print(lab.text.gsub("a-b-c", "-", "+"))                                       -- a+b+c  2
//! ```
//!
//! Positions are 1-based byte positions, as in Lua's `string.find`; text need not be UTF-8
//! (model output sometimes is not). Compiled patterns are kept, so a pattern used in a loop is
//! compiled once.

use std::cell::RefCell;
use std::collections::HashMap;

use mlua::{Lua, MultiValue, Table, Value};
use regex::bytes::{Captures, Regex, RegexBuilder};

/// Patterns kept compiled; past this many the cache starts over.
const CACHE_SIZE: usize = 256;

thread_local! {
    static COMPILED: RefCell<HashMap<String, Regex>> = RefCell::new(HashMap::new());
}

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("find", lua.create_function(find)?)?;
    m.set("match", lua.create_function(first_match)?)?;
    m.set("find_all", lua.create_function(find_all)?)?;
    m.set("gsub", lua.create_function(gsub)?)?;
    m.set("split", lua.create_function(split)?)?;
    m.set("escape", lua.create_function(|_, s: mlua::LuaString| Ok(regex::escape(&s.to_str()?)))?)?;
    Ok(m)
}

/// The compiled pattern, or an error naming the function and pointing at the fault.
pub fn compile(context: &str, pattern: &str) -> mlua::Result<Regex> {
    if let Some(re) = COMPILED.with(|c| c.borrow().get(pattern).cloned()) {
        return Ok(re);
    }
    let re = RegexBuilder::new(pattern).size_limit(1 << 24).build().map_err(|e| {
        mlua::Error::runtime(format!(
            "{context}: pattern {pattern:?} is not a valid regular expression (Rust regex syntax): {e}"
        ))
    })?;
    COMPILED.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= CACHE_SIZE {
            c.clear();
        }
        c.insert(pattern.to_string(), re.clone());
    });
    Ok(re)
}

/// 1-based start: a Lua `init`, negative counting from the end, as `string.find` takes it.
fn start_at(len: usize, init: Option<i64>) -> usize {
    match init {
        None | Some(0) => 0,
        Some(i) if i > 0 => ((i - 1) as usize).min(len),
        Some(i) => len.saturating_sub(i.unsigned_abs() as usize),
    }
}

/// The captures as Lua values: each group's text, or false where a group did not take part.
fn captures(lua: &Lua, caps: &Captures) -> mlua::Result<Vec<Value>> {
    (1..caps.len())
        .map(|i| match caps.get(i) {
            Some(m) => Ok(Value::String(lua.create_string(m.as_bytes())?)),
            None => Ok(Value::Boolean(false)),
        })
        .collect()
}

/// `find(s, pattern [, init])`: start and end of the first match (1-based, inclusive) and its
/// captures, or nil.
fn find(lua: &Lua, (s, pattern, init): (mlua::LuaString, String, Option<i64>)) -> mlua::Result<MultiValue> {
    let re = compile("lab.text.find", &pattern)?;
    let bytes = s.as_bytes();
    let from = start_at(bytes.len(), init);
    let Some(caps) = re.captures_at(&bytes, from) else { return Ok(MultiValue::from_vec(vec![Value::Nil])) };
    let whole = caps.get(0).expect("group 0 always matches");
    let mut out = vec![Value::Integer(whole.start() as i64 + 1), Value::Integer(whole.end() as i64)];
    out.extend(captures(lua, &caps)?);
    Ok(MultiValue::from_vec(out))
}

/// `match(s, pattern [, init])`: the captures of the first match, or the whole match when the
/// pattern has no groups; nil when nothing matches.
fn first_match(lua: &Lua, (s, pattern, init): (mlua::LuaString, String, Option<i64>)) -> mlua::Result<MultiValue> {
    let re = compile("lab.text.match", &pattern)?;
    let bytes = s.as_bytes();
    let Some(caps) = re.captures_at(&bytes, start_at(bytes.len(), init)) else {
        return Ok(MultiValue::from_vec(vec![Value::Nil]));
    };
    if caps.len() == 1 {
        return Ok(MultiValue::from_vec(vec![Value::String(lua.create_string(&caps[0])?)]));
    }
    Ok(MultiValue::from_vec(captures(lua, &caps)?))
}

/// `find_all(s, pattern)`: every non-overlapping match, as `{text, start, stop, captures...}`.
fn find_all(lua: &Lua, (s, pattern): (mlua::LuaString, String)) -> mlua::Result<Table> {
    let re = compile("lab.text.find_all", &pattern)?;
    let out = lua.create_table()?;
    for (i, caps) in re.captures_iter(&s.as_bytes()).enumerate() {
        let whole = caps.get(0).expect("group 0 always matches");
        let t = lua.create_table()?;
        t.set("text", lua.create_string(whole.as_bytes())?)?;
        t.set("start", whole.start() + 1)?;
        t.set("stop", whole.end())?;
        t.set("captures", lua.create_sequence_from(captures(lua, &caps)?)?)?;
        out.raw_set(i + 1, t)?;
    }
    Ok(out)
}

/// `gsub(s, pattern, replacement [, n])`: `$1`, `${name}` in the replacement refer to groups
/// (`$$` is a dollar sign). Returns the new string and the number of replacements.
fn gsub(
    lua: &Lua,
    (s, pattern, replacement, n): (mlua::LuaString, String, mlua::LuaString, Option<usize>),
) -> mlua::Result<(mlua::LuaString, usize)> {
    let re = compile("lab.text.gsub", &pattern)?;
    let bytes = s.as_bytes();
    let rep = &replacement.as_bytes()[..];
    if n == Some(0) {
        return Ok((lua.create_string(&bytes[..])?, 0)); // regex's replacen reads 0 as "all"
    }
    let mut count = 0;
    let replaced = re.replacen(&bytes, n.unwrap_or(0), |caps: &Captures| {
        count += 1;
        let mut out = Vec::new();
        caps.expand(rep, &mut out);
        out
    });
    Ok((lua.create_string(&replaced)?, count))
}

/// `split(s, pattern)`: the pieces between matches (empty pieces kept).
fn split(lua: &Lua, (s, pattern): (mlua::LuaString, String)) -> mlua::Result<Table> {
    let re = compile("lab.text.split", &pattern)?;
    let bytes = s.as_bytes();
    let pieces: Vec<Value> =
        re.split(&bytes).map(|p| lua.create_string(p).map(Value::String)).collect::<mlua::Result<_>>()?;
    lua.create_sequence_from(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_init_counts_from_the_end_like_string_find() {
        assert_eq!(start_at(10, None), 0);
        assert_eq!(start_at(10, Some(3)), 2);
        assert_eq!(start_at(10, Some(-3)), 7);
        assert_eq!(start_at(10, Some(40)), 10);
        assert_eq!(start_at(10, Some(-40)), 0);
    }
}
