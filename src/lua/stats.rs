//! `lab.stats`: the functions of [`crate::stats`] for Lua scripts.
//!
//! Counts are whole numbers, lists are Lua sequences, options go through [`Opts`] (an unknown
//! key is an error), results are plain tables that name their test in `test`:
//!
//! ```lua
//! local ci = lab.stats.wilson(166, 280, { confidence = 0.95 })   -- {test=..., lower=..., upper=...}
//! local f = lab.stats.fisher_exact(2, 280, 75, 280, { alternative = "less" })
//! print(lab.stats.format_p(f.p))                                   -- p < 1e-22
//! ```
//!
//! Every error starts with the function's name, then the argument and its value:
//! `lab.stats.wilson: k = 300: more successes than trials (n = 280)`.

use mlua::{Lua, LuaSerdeExt, Table, Value};
use serde::Serialize;

use crate::lua::opts::Opts;
use crate::stats::{self, Alternative, Interval, IntervalMethod, StatsError};

/// Builds the `lab.stats` table.
pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("wald", lua.create_function(wald)?)?;
    m.set("wilson", lua.create_function(wilson)?)?;
    m.set("clopper_pearson", lua.create_function(clopper_pearson)?)?;
    m.set("proportion_ci", lua.create_function(proportion_ci)?)?;
    m.set("two_proportion_z", lua.create_function(two_proportion_z)?)?;
    m.set("fisher_exact", lua.create_function(fisher_exact)?)?;
    m.set("chi2_2x2", lua.create_function(chi2_2x2)?)?;
    m.set("newcombe", lua.create_function(newcombe)?)?;
    m.set("cohens_h", lua.create_function(cohens_h)?)?;
    m.set("welch_t", lua.create_function(|lua, args| two_samples(lua, "welch_t", args, stats::welch_t))?)?;
    m.set("student_t", lua.create_function(|lua, args| two_samples(lua, "student_t", args, stats::student_t))?)?;
    m.set("mean", lua.create_function(|_, xs| one_sample("mean", xs, stats::mean))?)?;
    m.set("sd", lua.create_function(|_, xs| one_sample("sd", xs, stats::sd))?)?;
    m.set("se", lua.create_function(|_, xs| one_sample("se", xs, stats::standard_error))?)?;
    m.set("holm", lua.create_function(|lua, ps| adjust(lua, "holm", ps, stats::holm))?)?;
    m.set("bonferroni", lua.create_function(|lua, ps| adjust(lua, "bonferroni", ps, stats::bonferroni))?)?;
    m.set("format_p", lua.create_function(format_p)?)?;
    m.set("format_pct", lua.create_function(format_pct)?)?;
    Ok(m)
}

// ------------------------------------------------------------------------------------------------
// The functions
// ------------------------------------------------------------------------------------------------

/// `(k1, n1, k2, n2, opts)` and `(k, n, opts)` as they arrive from Lua.
type TwoProportionArgs = (Value, Value, Value, Value, Value);
type OneProportionArgs = (Value, Value, Value);

/// `wald(k, n, {confidence})`.
fn wald(lua: &Lua, args: OneProportionArgs) -> mlua::Result<Value> {
    one_proportion(lua, "wald", args, stats::wald_interval)
}

/// `wilson(k, n, {confidence})`.
fn wilson(lua: &Lua, args: OneProportionArgs) -> mlua::Result<Value> {
    one_proportion(lua, "wilson", args, stats::wilson_interval)
}

/// `clopper_pearson(k, n, {confidence})`.
fn clopper_pearson(lua: &Lua, args: OneProportionArgs) -> mlua::Result<Value> {
    one_proportion(lua, "clopper_pearson", args, stats::clopper_pearson_interval)
}

/// One interval of k out of n, by `interval`.
fn one_proportion(
    lua: &Lua,
    name: &str,
    (k, n, options): OneProportionArgs,
    interval: fn(i64, i64, f64) -> stats::Result<Interval>,
) -> mlua::Result<Value> {
    let (k, n) = (count(name, "k", k)?, count(name, "n", n)?);
    let mut o = Opts::new(&context(name), options)?;
    let confidence = o.get_or(lua, "confidence", stats::DEFAULT_CONFIDENCE)?;
    o.finish()?;
    to_table(lua, &interval(k, n, confidence).map_err(|e| fail(name, e))?)
}

/// `proportion_ci(k, n, {method = "wilson", confidence = 0.95})`.
fn proportion_ci(lua: &Lua, (k, n, options): OneProportionArgs) -> mlua::Result<Value> {
    const NAME: &str = "proportion_ci";
    let (k, n) = (count(NAME, "k", k)?, count(NAME, "n", n)?);
    let mut o = Opts::new(&context(NAME), options)?;
    let method = o.get_or(lua, "method", "wilson".to_string())?;
    let confidence = o.get_or(lua, "confidence", stats::DEFAULT_CONFIDENCE)?;
    o.finish()?;
    let method = IntervalMethod::parse(&method).map_err(|e| fail(NAME, e))?;
    to_table(lua, &stats::proportion_interval(k, n, method, confidence).map_err(|e| fail(NAME, e))?)
}

/// `two_proportion_z(k1, n1, k2, n2, {alternative})`.
fn two_proportion_z(lua: &Lua, (k1, n1, k2, n2, options): TwoProportionArgs) -> mlua::Result<Value> {
    const NAME: &str = "two_proportion_z";
    let [k1, n1, k2, n2] = counts(NAME, [k1, n1, k2, n2])?;
    let mut o = Opts::new(&context(NAME), options)?;
    let alternative = alternative(lua, NAME, &mut o)?;
    o.finish()?;
    to_table(lua, &stats::two_proportion_z(k1, n1, k2, n2, alternative).map_err(|e| fail(NAME, e))?)
}

/// `fisher_exact(k1, n1, k2, n2, {alternative})`.
fn fisher_exact(lua: &Lua, (k1, n1, k2, n2, options): TwoProportionArgs) -> mlua::Result<Value> {
    const NAME: &str = "fisher_exact";
    let [k1, n1, k2, n2] = counts(NAME, [k1, n1, k2, n2])?;
    let mut o = Opts::new(&context(NAME), options)?;
    let alternative = alternative(lua, NAME, &mut o)?;
    o.finish()?;
    to_table(lua, &stats::fisher_exact(k1, n1, k2, n2, alternative).map_err(|e| fail(NAME, e))?)
}

/// `chi2_2x2(k1, n1, k2, n2, {correction = true})`.
fn chi2_2x2(lua: &Lua, (k1, n1, k2, n2, options): TwoProportionArgs) -> mlua::Result<Value> {
    const NAME: &str = "chi2_2x2";
    let [k1, n1, k2, n2] = counts(NAME, [k1, n1, k2, n2])?;
    let mut o = Opts::new(&context(NAME), options)?;
    let correction = o.get_or(lua, "correction", true)?;
    o.finish()?;
    to_table(lua, &stats::chi2_2x2(k1, n1, k2, n2, correction).map_err(|e| fail(NAME, e))?)
}

/// `newcombe(k1, n1, k2, n2, {confidence})`.
fn newcombe(lua: &Lua, (k1, n1, k2, n2, options): TwoProportionArgs) -> mlua::Result<Value> {
    const NAME: &str = "newcombe";
    let [k1, n1, k2, n2] = counts(NAME, [k1, n1, k2, n2])?;
    let mut o = Opts::new(&context(NAME), options)?;
    let confidence = o.get_or(lua, "confidence", stats::DEFAULT_CONFIDENCE)?;
    o.finish()?;
    to_table(lua, &stats::newcombe_interval(k1, n1, k2, n2, confidence).map_err(|e| fail(NAME, e))?)
}

/// `cohens_h(p1, p2)`.
fn cohens_h(lua: &Lua, (p1, p2): (Value, Value)) -> mlua::Result<Value> {
    const NAME: &str = "cohens_h";
    let (p1, p2) = (number(NAME, "p1", p1)?, number(NAME, "p2", p2)?);
    to_table(lua, &stats::cohens_h(p1, p2).map_err(|e| fail(NAME, e))?)
}

/// `welch_t|student_t(xs, ys, {alternative})`.
fn two_samples(
    lua: &Lua,
    name: &str,
    (xs, ys, options): (Value, Value, Value),
    test: fn(&[f64], &[f64], Alternative) -> stats::Result<stats::TTest>,
) -> mlua::Result<Value> {
    let (xs, ys) = (numbers(name, "xs", xs)?, numbers(name, "ys", ys)?);
    let mut o = Opts::new(&context(name), options)?;
    let alternative = alternative(lua, name, &mut o)?;
    o.finish()?;
    to_table(lua, &test(&xs, &ys, alternative).map_err(|e| fail(name, e))?)
}

/// `mean|sd|se(xs)`: a number.
fn one_sample(name: &str, xs: Value, statistic: fn(&[f64]) -> stats::Result<f64>) -> mlua::Result<f64> {
    let xs = numbers(name, "xs", xs)?;
    statistic(&xs).map_err(|e| fail(name, e))
}

/// `holm|bonferroni(ps)`: the adjusted p-values, a list in the given order.
fn adjust(lua: &Lua, name: &str, ps: Value, method: fn(&[f64]) -> stats::Result<Vec<f64>>) -> mlua::Result<Value> {
    let ps = numbers(name, "ps", ps)?;
    to_table(lua, &method(&ps).map_err(|e| fail(name, e))?)
}

/// `format_p(p, {digits = 2, floor = 1e-22})`.
fn format_p(lua: &Lua, (p, options): (Value, Value)) -> mlua::Result<String> {
    const NAME: &str = "format_p";
    let p = number(NAME, "p", p)?;
    let mut o = Opts::new(&context(NAME), options)?;
    let digits = digits(lua, &mut o, stats::DEFAULT_P_DIGITS)?;
    let floor = o.get_or(lua, "floor", stats::DEFAULT_P_FLOOR)?;
    o.finish()?;
    stats::format_p(p, digits, floor).map_err(|e| fail(NAME, e))
}

/// `format_pct(x, {digits = 1})`.
fn format_pct(lua: &Lua, (x, options): (Value, Value)) -> mlua::Result<String> {
    const NAME: &str = "format_pct";
    let x = number(NAME, "x", x)?;
    let mut o = Opts::new(&context(NAME), options)?;
    let digits = digits(lua, &mut o, stats::DEFAULT_PCT_DIGITS)?;
    o.finish()?;
    stats::format_pct(x, digits).map_err(|e| fail(NAME, e))
}

// ------------------------------------------------------------------------------------------------
// Reading arguments
// ------------------------------------------------------------------------------------------------

/// `lab.stats.NAME`, the context of errors and options.
fn context(name: &str) -> String {
    format!("lab.stats.{name}")
}

/// A [`StatsError`] as a Lua error prefixed with the function.
fn fail(name: &str, e: StatsError) -> mlua::Error {
    mlua::Error::runtime(format!("{}: {e}", context(name)))
}

fn bad_argument(name: &str, message: String) -> mlua::Error {
    mlua::Error::runtime(format!("{}: {message}", context(name)))
}

/// A count: an integer, or a float with no fractional part.
fn count(name: &str, argument: &str, value: Value) -> mlua::Result<i64> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53: larger floats are not exact integers
    match value {
        Value::Integer(i) => Ok(i),
        Value::Number(x) if x.fract() == 0.0 && x.abs() <= EXACT => Ok(x as i64),
        Value::Number(x) => Err(bad_argument(name, format!("{argument} = {x}: not a whole number"))),
        Value::Nil => Err(bad_argument(name, format!("{argument} is missing (expected a whole number)"))),
        other => Err(bad_argument(
            name,
            format!("{argument} must be a whole number, got {}", crate::lua::a_type(other.type_name())),
        )),
    }
}

/// The four counts of a two-proportion function, named k1, n1, k2, n2.
fn counts(name: &str, values: [Value; 4]) -> mlua::Result<[i64; 4]> {
    let [k1, n1, k2, n2] = values;
    Ok([count(name, "k1", k1)?, count(name, "n1", n1)?, count(name, "k2", k2)?, count(name, "n2", n2)?])
}

/// A number (NaN passes, to be refused by the statistic with its name).
fn number(name: &str, argument: &str, value: Value) -> mlua::Result<f64> {
    match value {
        Value::Integer(i) => Ok(i as f64),
        Value::Number(x) => Ok(x),
        Value::Nil => Err(bad_argument(name, format!("{argument} is missing (expected a number)"))),
        other => Err(bad_argument(
            name,
            format!("{argument} must be a number, got {}", crate::lua::a_type(other.type_name())),
        )),
    }
}

/// A sequence of numbers `{0.59, 0.44, 0.55}`.
fn numbers(name: &str, argument: &str, value: Value) -> mlua::Result<Vec<f64>> {
    let table = match value {
        Value::Table(t) => t,
        Value::Nil => return Err(bad_argument(name, format!("{argument} is missing (expected a list of numbers)"))),
        other => {
            return Err(bad_argument(
                name,
                format!("{argument} must be a list of numbers, got {}", crate::lua::a_type(other.type_name())),
            ))
        }
    };
    (1..=table.raw_len())
        .map(|i| match table.raw_get::<Value>(i)? {
            Value::Integer(v) => Ok(v as f64),
            Value::Number(v) => Ok(v),
            other => Err(bad_argument(
                name,
                format!("{argument}[{i}] must be a number, got {}", crate::lua::a_type(other.type_name())),
            )),
        })
        .collect()
}

/// Option `alternative`: "two-sided" (default), "less" or "greater".
fn alternative(lua: &Lua, name: &str, o: &mut Opts) -> mlua::Result<Alternative> {
    match o.get::<String>(lua, "alternative")? {
        None => Ok(Alternative::default()),
        Some(text) => Alternative::parse(&text).map_err(|e| fail(name, e)),
    }
}

/// Option `digits`: a count of digits, at least 1 and at most 17.
fn digits(lua: &Lua, o: &mut Opts, default: usize) -> mlua::Result<usize> {
    let digits: i64 = o.get_or(lua, "digits", default as i64)?;
    if !(0..=17).contains(&digits) {
        return Err(o.bad_value("digits", format!("= {digits}: must lie between 0 and 17")));
    }
    Ok(digits as usize)
}

/// A plain Lua table from a result: lists without metatables, `None` as an absent key.
pub(crate) fn to_table<T: Serialize + ?Sized>(lua: &Lua, value: &T) -> mlua::Result<Value> {
    let options = mlua::serde::SerializeOptions::new()
        .set_array_metatable(false)
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    lua.to_value_with(value, options)
}
