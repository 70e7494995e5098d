//! Strict option tables.
//!
//! Every Lua function that takes an options table reads it through [`Opts`]: each key it
//! reads is marked as known, and [`Opts::finish`] rejects whatever is left, naming the
//! key and suggesting the closest known one (`temprature` -> `temperature`). A mistyped
//! option is therefore an error, never a silently ignored setting.

use std::cell::RefCell;
use std::collections::BTreeMap;

use mlua::{FromLua, Lua, Table, Value};

/// What the code reads of one option: the Rust type it converts to, and its default if any (as
/// Rust writes it: "64", "\"f32\"", "[]").
#[derive(Debug, Clone, PartialEq)]
pub struct ReadOption {
    pub rust_type: &'static str,
    pub default: Option<String>,
}

thread_local! {
    /// Every option read so far, by key: what tests/options.rs holds the LuaLS stubs' types and
    /// "Default ..." to.
    static READ: RefCell<BTreeMap<String, ReadOption>> = const { RefCell::new(BTreeMap::new()) };
}

/// The options read since the last call (see `READ`), emptying the record.
pub fn take_read_options() -> BTreeMap<String, ReadOption> {
    READ.with(|d| std::mem::take(&mut *d.borrow_mut()))
}

fn note_read<T>(key: &str, default: Option<String>) {
    let read = ReadOption { rust_type: std::any::type_name::<T>(), default };
    READ.with(|d| {
        let mut d = d.borrow_mut();
        // A key read twice keeps the read that knows its default.
        if read.default.is_some() || !d.contains_key(key) {
            d.insert(key.to_string(), read);
        }
    });
}

/// Reader over an optional Lua options table for the function `context` (e.g. `model:sample`).
pub struct Opts {
    context: String,
    table: Option<Table>,
    known: Vec<&'static str>,
}

impl Opts {
    /// `value` may be nil (no options) or a table; anything else is an error.
    pub fn new(context: &str, value: Value) -> mlua::Result<Self> {
        let table = match value {
            Value::Nil => None,
            Value::Table(t) => Some(t),
            other => {
                return Err(mlua::Error::runtime(format!(
                    "{context}: options must be a table, got {}",
                    crate::lua::a_type(other.type_name())
                )))
            }
        };
        Ok(Opts { context: context.to_string(), table, known: Vec::new() })
    }

    /// Name of the function these options belong to, for error messages.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// Reads `key` if present; a value of the wrong type is an error naming the key.
    pub fn get<T: FromLua + 'static>(&mut self, lua: &Lua, key: &'static str) -> mlua::Result<Option<T>> {
        self.known.push(key);
        note_read::<T>(key, None);
        let Some(table) = &self.table else { return Ok(None) };
        let raw: Value = table.raw_get(key)?;
        if raw.is_nil() {
            return Ok(None);
        }
        let type_name = raw.type_name();
        // mlua turns any value into a boolean by Lua truthiness ("no" would be true).
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<bool>() && !matches!(raw, Value::Boolean(_)) {
            return Err(mlua::Error::runtime(format!(
                "{}: option '{key}' must be true or false, got {}",
                self.context,
                crate::lua::a_type(type_name)
            )));
        }
        // A number given for a count: the value shown, since mlua says only "out of range".
        let number = match raw {
            Value::Integer(i) => Some(i.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        T::from_lua(raw, lua).map(Some).map_err(|e| match (whole_number_range::<T>(), number) {
            (Some(range), Some(number)) => self.bad_value(key, format!("must be a whole number {range}, got {number}")),
            _ => mlua::Error::runtime(format!(
                "{}: option '{key}' has the wrong type ({type_name}): {}",
                self.context,
                short_conversion_error(&e)
            )),
        })
    }

    /// Reads `key`, falling back to `default` when absent.
    pub fn get_or<T: FromLua + std::fmt::Debug + 'static>(
        &mut self,
        lua: &Lua,
        key: &'static str,
        default: T,
    ) -> mlua::Result<T> {
        let value = self.get(lua, key)?;
        note_read::<T>(key, Some(format!("{default:?}")));
        Ok(value.unwrap_or(default))
    }

    /// Reads a key that must be present.
    pub fn require<T: FromLua + 'static>(&mut self, lua: &Lua, key: &'static str) -> mlua::Result<T> {
        match self.get(lua, key)? {
            Some(v) => Ok(v),
            None => Err(mlua::Error::runtime(format!("{}: option '{key}' is required", self.context))),
        }
    }

    /// An error about the value of `key`, in the common format.
    pub fn bad_value(&self, key: &str, message: impl std::fmt::Display) -> mlua::Error {
        mlua::Error::runtime(format!("{}: option '{key}' {message}", self.context))
    }

    /// Rejects any key that was never read.
    pub fn finish(self) -> mlua::Result<()> {
        let Some(table) = &self.table else { return Ok(()) };
        for pair in table.pairs::<Value, Value>() {
            let (key, _) = pair?;
            let name = match &key {
                Value::String(s) => s.to_str()?.to_string(),
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "{}: option keys must be names, got {} key",
                        self.context,
                        crate::lua::a_type(other.type_name())
                    )))
                }
            };
            if !self.known.iter().any(|k| *k == name) {
                return Err(mlua::Error::runtime(unknown_option(&self.context, &name, &self.known)));
            }
        }
        Ok(())
    }
}

/// The message of an unknown option: its name, the closest known one, and every known one.
fn unknown_option(context: &str, name: &str, known: &[&str]) -> String {
    let mut msg = format!("{context}: unknown option '{name}'");
    if let Some(s) = closest(name, known) {
        msg.push_str(&format!(" (did you mean '{s}'?)"));
    }
    let mut known = known.to_vec();
    known.sort_unstable();
    known.dedup();
    msg.push_str(&format!(". Known options: {}", known.join(", ")));
    msg
}

/// `lab.options`: the same strict option tables for functions written in Lua (lab.figure, the
/// study's report, a user's own helpers), with the same messages and suggestions.
pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("check", lua.create_function(check)?)?;
    m.set("list", lua.create_function(list)?)?;
    Ok(m)
}

/// `check(opts, known, context)`: `opts` (or `{}` for nil) when every key is known.
fn check(lua: &Lua, (opts, known, context): (Value, Vec<String>, String)) -> mlua::Result<Table> {
    let table = match opts {
        Value::Nil => return lua.create_table(),
        Value::Table(t) => t,
        other => {
            return Err(mlua::Error::runtime(format!(
                "{context}: options must be a table, got {}",
                crate::lua::a_type(other.type_name())
            )))
        }
    };
    let known: Vec<&str> = known.iter().map(String::as_str).collect();
    for pair in table.pairs::<Value, Value>() {
        let (key, _) = pair?;
        let Value::String(name) = &key else {
            return Err(mlua::Error::runtime(format!(
                "{context}: option keys must be names, got {} key",
                crate::lua::a_type(key.type_name())
            )));
        };
        let name = name.to_str()?.to_string();
        if !known.contains(&name.as_str()) {
            return Err(mlua::Error::runtime(unknown_option(&context, &name, &known)));
        }
    }
    Ok(table)
}

/// `list(value, what, context)`: `value` when it is a non-empty sequence (keys exactly 1..n).
fn list(_: &Lua, (value, what, context): (Value, String, String)) -> mlua::Result<Table> {
    let Value::Table(t) = value else {
        return Err(mlua::Error::runtime(format!(
            "{context}: {what} must be a list, got {}",
            crate::lua::a_type(value.type_name())
        )));
    };
    let n = t.pairs::<Value, Value>().count();
    if n == 0 || n != t.raw_len() {
        return Err(mlua::Error::runtime(format!("{context}: {what} must be a non-empty list {{ {{...}}, {{...}} }}")));
    }
    Ok(t)
}

/// The values an integer option type holds, in words, or None for other types: the reason a
/// number such as -5 or 1.5 does not convert, which mlua reports only as "out of range".
fn whole_number_range<T: 'static>() -> Option<&'static str> {
    use std::any::TypeId;
    let t = TypeId::of::<T>();
    if [TypeId::of::<usize>(), TypeId::of::<u64>(), TypeId::of::<u32>()].contains(&t) {
        Some(">= 0")
    } else if t == TypeId::of::<u16>() {
        Some("from 0 to 65535")
    } else if t == TypeId::of::<u8>() {
        Some("from 0 to 255")
    } else if [TypeId::of::<i64>(), TypeId::of::<i32>(), TypeId::of::<isize>()].contains(&t) {
        Some("(no fraction)")
    } else {
        None
    }
}

fn short_conversion_error(e: &mlua::Error) -> String {
    match e {
        mlua::Error::FromLuaConversionError { from, to, message } => match message {
            Some(m) => format!("expected {to}, got {from} ({m})"),
            None => format!("expected {to}, got {from}"),
        },
        other => other.to_string(),
    }
}

/// The known name within edit distance 2 of `name`, if any; ties go to the alphabetically first,
/// so that the suggestion does not depend on the order the names came in.
pub fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    // Two edits for short names, more for long ones (`gradient_checkpoint` for
    // `gradient_checkpointing`), never so many that unrelated names match.
    let within = (name.chars().count() / 6).max(2);
    known.iter().map(|k| (edit_distance(name, k), *k)).filter(|(d, _)| *d <= within).min().map(|(_, k)| k)
}

/// Levenshtein distance between two short strings.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_option_is_rejected_with_a_suggestion() {
        let lua = Lua::new();
        let t: Table = lua.load("return { temprature = 1.0 }").eval().unwrap();
        let mut o = Opts::new("model:sample", Value::Table(t)).unwrap();
        let _: Option<f64> = o.get(&lua, "temperature").unwrap();
        let err = o.finish().unwrap_err().to_string();
        assert!(err.contains("unknown option 'temprature'"), "{err}");
        assert!(err.contains("did you mean 'temperature'"), "{err}");
    }

    #[test]
    fn a_long_name_cut_short_still_gets_its_suggestion() {
        assert_eq!(closest("gradient_checkpoint", &["gradient_checkpointing", "seed"]), Some("gradient_checkpointing"));
        assert_eq!(closest("lr", &["seed", "max_steps"]), None);
    }

    #[test]
    fn suggestions_break_ties_the_same_way_whatever_the_order() {
        assert_eq!(closest("nn", &["on", "n"]), Some("n"));
        assert_eq!(closest("nn", &["n", "on"]), Some("n"));
    }

    #[test]
    fn a_flag_must_be_a_boolean_not_any_truthy_value() {
        let lua = Lua::new();
        let t: Table = lua.load("return { shuffle = 'no' }").eval().unwrap();
        let mut o = Opts::new("lab.train.sft", Value::Table(t)).unwrap();
        let err = o.get::<bool>(&lua, "shuffle").unwrap_err().to_string();
        assert!(err.contains("option 'shuffle' must be true or false, got a string"), "{err}");
        let t: Table = lua.load("return { shuffle = 1 }").eval().unwrap();
        let mut o = Opts::new("lab.train.sft", Value::Table(t)).unwrap();
        let err = o.get::<bool>(&lua, "shuffle").unwrap_err().to_string();
        assert!(err.contains("got an integer"), "{err}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_key() {
        let lua = Lua::new();
        let t: Table = lua.load("return { n = 'four' }").eval().unwrap();
        let mut o = Opts::new("model:sample", Value::Table(t)).unwrap();
        let err = o.get::<i64>(&lua, "n").unwrap_err().to_string();
        assert!(err.contains("option 'n'"), "{err}");
    }

    #[test]
    fn a_count_given_a_negative_or_fractional_number_says_it_must_be_whole() {
        let lua = Lua::new();
        let t: Table = lua.load("return { max_steps = -5, r = 1.5, seed = 2.5, batch = 4.0 }").eval().unwrap();
        let mut o = Opts::new("lab.train.sft", Value::Table(t)).unwrap();
        let err = o.get::<usize>(&lua, "max_steps").unwrap_err().to_string();
        assert!(err.contains("option 'max_steps' must be a whole number >= 0, got -5"), "{err}");
        let err = o.get::<u32>(&lua, "r").unwrap_err().to_string();
        assert!(err.contains("option 'r' must be a whole number >= 0, got 1.5"), "{err}");
        let err = o.get::<i64>(&lua, "seed").unwrap_err().to_string();
        assert!(err.contains("option 'seed' must be a whole number (no fraction), got 2.5"), "{err}");
        assert_eq!(o.get::<usize>(&lua, "batch").unwrap(), Some(4), "a float with no fraction is a whole number");
    }
}
