//! `lab.plot`: figures from Lua tables, drawn by [`crate::plot`].
//!
//! `lab.plot.line(spec, path)` takes one table describing the whole figure (axes as flat
//! `x_*` / `y_*` keys, a list of `series`, a list of `bands`) and a path or a list of paths
//! ending in `.png` or `.svg`. Every table is read strictly: a misspelt key is an error that
//! names it, inside each series and band too.

use std::path::Path;

use mlua::{Lua, Table, Value};

use super::opts::Opts;
use crate::plot::{Axis, Band, Figure, LineStyle, Scale, Series};

const LINE: &str = "lab.plot.line";

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("line", lua.create_function(line)?)?;
    Ok(m)
}

/// `lab.plot.line(spec, path)`: draws and writes the figure to each path.
fn line(lua: &Lua, (spec, path): (Value, Value)) -> mlua::Result<()> {
    let paths = output_paths(path)?;
    let fig = figure_from_lua(lua, spec)?;
    for p in &paths {
        fig.save(Path::new(p)).map_err(|e| mlua::Error::runtime(format!("{LINE}: {e}")))?;
    }
    Ok(())
}

/// One path, or a list of them (the same figure as PNG and SVG).
fn output_paths(path: Value) -> mlua::Result<Vec<String>> {
    let bad = || {
        mlua::Error::runtime(format!(
            "{LINE}: the second argument must be a path ending in .png or .svg, or a list of such paths"
        ))
    };
    match path {
        Value::String(s) => Ok(vec![s.to_str()?.to_string()]),
        Value::Table(t) => {
            let paths = t.sequence_values::<String>().collect::<mlua::Result<Vec<_>>>().map_err(|_| bad())?;
            if paths.is_empty() {
                return Err(bad());
            }
            Ok(paths)
        }
        _ => Err(bad()),
    }
}

/// Reads a figure spec table (see `lib/meta/plot.lua` for every key and its default).
pub fn figure_from_lua(lua: &Lua, spec: Value) -> mlua::Result<Figure> {
    if !matches!(spec, Value::Table(_)) {
        return Err(mlua::Error::runtime(format!(
            "{LINE}: the first argument must be a figure table, got {}",
            crate::lua::a_type(spec.type_name())
        )));
    }
    let mut o = Opts::new(LINE, spec)?;
    let defaults = Figure::default();
    let title = o.get(lua, "title")?;
    let caption = o.get(lua, "caption")?;
    let width = o.get_or(lua, "width", defaults.width)?;
    let height = o.get_or(lua, "height", defaults.height)?;
    let x = read_axis(lua, &mut o, &X_KEYS)?;
    let y = read_axis(lua, &mut o, &Y_KEYS)?;
    let legend = parse_opt(&mut o, lua, "legend")?.unwrap_or(defaults.legend);
    let series: Option<Table> = o.get(lua, "series")?;
    let bands: Option<Table> = o.get(lua, "bands")?;
    // Unknown keys first: a misspelt `series` should say so, not "series is required".
    o.finish()?;
    let series = series.ok_or_else(|| {
        mlua::Error::runtime(format!("{LINE}: option 'series' is required (a list of series tables)"))
    })?;
    let series = list(&series, "series")?
        .into_iter()
        .enumerate()
        .map(|(i, v)| read_series(lua, i + 1, v))
        .collect::<mlua::Result<_>>()?;
    let bands = match bands {
        Some(t) => list(&t, "bands")?
            .into_iter()
            .enumerate()
            .map(|(i, v)| read_band(lua, i + 1, v))
            .collect::<mlua::Result<_>>()?,
        None => Vec::new(),
    };
    Ok(Figure { title, caption, width, height, x, y, legend, series, bands })
}

/// The keys of one axis in the flat spec table.
struct AxisKeys {
    label: &'static str,
    scale: &'static str,
    linthresh: &'static str,
    range: &'static str,
    ticks: &'static str,
    tick_labels: &'static str,
}

const X_KEYS: AxisKeys = AxisKeys {
    label: "x_label",
    scale: "x_scale",
    linthresh: "x_linthresh",
    range: "x_range",
    ticks: "x_ticks",
    tick_labels: "x_tick_labels",
};

const Y_KEYS: AxisKeys = AxisKeys {
    label: "y_label",
    scale: "y_scale",
    linthresh: "y_linthresh",
    range: "y_range",
    ticks: "y_ticks",
    tick_labels: "y_tick_labels",
};

fn read_axis(lua: &Lua, o: &mut Opts, keys: &AxisKeys) -> mlua::Result<Axis> {
    let label = o.get_or(lua, keys.label, String::new())?;
    let scale_name: String = o.get_or(lua, keys.scale, "linear".to_string())?;
    let linthresh: f64 = o.get_or(lua, keys.linthresh, 1.0)?;
    let scale = Scale::parse(&scale_name, linthresh)
        .map_err(|e| mlua::Error::runtime(format!("{}: option '{}': {e}", o.context(), keys.scale)))?;
    let range = match o.get::<Vec<f64>>(lua, keys.range)? {
        None => None,
        Some(r) if r.len() == 2 => Some((r[0], r[1])),
        Some(r) => return Err(o.bad_value(keys.range, format!("must be {{low, high}}, got {} values", r.len()))),
    };
    let ticks = o.get(lua, keys.ticks)?;
    let tick_labels = o.get(lua, keys.tick_labels)?;
    Ok(Axis { label, scale, range, ticks, tick_labels })
}

/// Reads an optional string key and parses it (colour, marker, line style, legend position).
fn parse_opt<T: std::str::FromStr<Err = String>>(
    o: &mut Opts,
    lua: &Lua,
    key: &'static str,
) -> mlua::Result<Option<T>> {
    match o.get::<String>(lua, key)? {
        None => Ok(None),
        Some(s) => {
            s.parse().map(Some).map_err(|e| mlua::Error::runtime(format!("{}: option '{key}': {e}", o.context())))
        }
    }
}

/// The items of a list-valued key; a table with named keys is an error.
fn list(t: &Table, key: &str) -> mlua::Result<Vec<Value>> {
    let items: Vec<Value> = t.sequence_values::<Value>().collect::<mlua::Result<_>>()?;
    if items.len() != t.pairs::<Value, Value>().count() {
        return Err(mlua::Error::runtime(format!(
            "{LINE}: option '{key}' must be a list of tables, {{ {{...}}, {{...}} }}"
        )));
    }
    Ok(items)
}

/// The error context of one series: its number and, when it has one, its name.
fn series_context(i: usize, v: &Value) -> String {
    let name = match v {
        Value::Table(t) => t.raw_get::<Option<String>>("name").ok().flatten(),
        _ => None,
    };
    match name {
        Some(n) => format!("{LINE}: series[{i}] ('{n}')"),
        None => format!("{LINE}: series[{i}]"),
    }
}

fn read_series(lua: &Lua, i: usize, v: Value) -> mlua::Result<Series> {
    let mut o = Opts::new(&series_context(i, &v), v)?;
    let mut s = Series::new("", Vec::new(), Vec::new());
    s.name = o.get_or(lua, "name", String::new())?;
    s.x = o.require(lua, "x")?;
    s.y = o.require(lua, "y")?;
    s.yerr_low = o.get(lua, "yerr_low")?;
    s.yerr_high = o.get(lua, "yerr_high")?;
    s.color = parse_opt(&mut o, lua, "color")?;
    s.marker = parse_opt(&mut o, lua, "marker")?;
    s.line = parse_opt(&mut o, lua, "line")?.unwrap_or(LineStyle::Solid);
    s.line_width = o.get_or(lua, "line_width", s.line_width)?;
    s.marker_size = o.get_or(lua, "marker_size", s.marker_size)?;
    s.faint_x = o.get_or(lua, "faint_x", Vec::new())?;
    s.faint_y = o.get_or(lua, "faint_y", Vec::new())?;
    o.finish()?;
    Ok(s)
}

fn read_band(lua: &Lua, i: usize, v: Value) -> mlua::Result<Band> {
    let mut o = Opts::new(&format!("{LINE}: bands[{i}]"), v)?;
    let from: f64 = o.require(lua, "from")?;
    let to: f64 = o.require(lua, "to")?;
    let mut b = Band::new(from, to, o.get(lua, "label")?);
    if let Some(c) = parse_opt(&mut o, lua, "color")? {
        b.color = c;
    }
    b.alpha = o.get_or(lua, "alpha", b.alpha)?;
    o.finish()?;
    Ok(b)
}
