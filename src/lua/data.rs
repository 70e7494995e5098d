//! `lab.data`: training rows from JSONL files or Lua tables.

use std::rc::Rc;

use mlua::{Lua, LuaSerdeExt, MetaMethod, Table, UserData, UserDataMethods, Value};

use super::opts::Opts;
use crate::data::{row_from_json, Dataset};

/// The Lua handle of a dataset.
#[derive(Clone)]
pub struct LuaDataset(pub Rc<Dataset>);

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "jsonl",
        lua.create_function(|lua, (path, opts): (String, Value)| {
            let mut o = Opts::new("lab.data.jsonl", opts)?;
            let on_error: String = o.get_or(lua, "on_error", "raise".to_string())?;
            let skip = match on_error.as_str() {
                "raise" => false,
                "skip" => true,
                other => return Err(o.bad_value("on_error", format!("must be \"raise\" or \"skip\", got \"{other}\""))),
            };
            o.finish()?;
            let ds = Dataset::jsonl(std::path::Path::new(&path), skip).map_err(mlua::Error::external)?;
            for s in &ds.skipped {
                eprintln!("warning: skipped {s}");
            }
            Ok(LuaDataset(Rc::new(ds)))
        })?,
    )?;
    m.set(
        "rows",
        lua.create_function(|lua, (rows, name): (Table, Option<String>)| {
            let mut out = Vec::new();
            for (i, r) in rows.sequence_values::<Value>().enumerate() {
                let json: serde_json::Value = lua.from_value(r?)?;
                let row = row_from_json(json)
                    .map_err(|e| mlua::Error::runtime(format!("lab.data.rows: row {}: {e}", i + 1)))?;
                out.push(row);
            }
            if out.is_empty() {
                return Err(mlua::Error::runtime("lab.data.rows: no rows"));
            }
            Ok(LuaDataset(Rc::new(Dataset {
                rows: out,
                source: name.unwrap_or_else(|| "<lua table>".into()),
                skipped: vec![],
            })))
        })?,
    )?;
    Ok(m)
}

impl UserData for LuaDataset {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Len, |_, this, ()| Ok(this.0.rows.len()));
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            Ok(format!("Dataset({} rows from {})", this.0.rows.len(), this.0.source))
        });
        methods.add_method("len", |_, this, ()| Ok(this.0.rows.len()));
        methods.add_method("source", |_, this, ()| Ok(this.0.source.clone()));
        methods.add_method("row", |lua, this, i: usize| match i.checked_sub(1).and_then(|k| this.0.rows.get(k)) {
            Some(r) => lua.to_value(r),
            None => Err(mlua::Error::runtime(format!("dataset:row({i}): index out of range 1..{}", this.0.rows.len()))),
        });
        methods.add_method("take", |_, this, n: usize| {
            let rows = this.0.rows.iter().take(n).cloned().collect();
            Ok(LuaDataset(Rc::new(Dataset { rows, source: this.0.source.clone(), skipped: vec![] })))
        });
    }
}
