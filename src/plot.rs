//! Line plots of results, drawn in pure Rust: PNG or SVG, no system fonts, no Python.
//!
//! A [`Figure`] is a plain description (axes, series, shaded bands, legend); [`Figure::save`]
//! checks it ([`Figure::validate`]) and draws it to a file whose extension picks the format.
//! Everything is laid out in pixels by this module rather than by plotters' chart builder, so
//! that the x axis can be symmetric-log (dose 0 next to doses 1..375), ticks can be explicit,
//! the legend can move out of the data's way, and text sits where it is meant to on both
//! backends.
//!
//! Sizes (fonts, line widths, markers) are given for a 1600 x 1000 figure and scale with it.
//! PNGs are drawn at twice their size and averaged down: plotters' raster lines have no
//! anti-aliasing of their own.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::store;

/// The embedded font, so figures look the same on a bare CI machine as on a laptop.
/// The SVG output names DejaVu first and falls back to the viewer's sans-serif.
const FONT_NAME: &str = "DejaVu Sans, sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// DejaVu Sans's cap height as a fraction of the pixel size ab_glyph scales to
/// (capHeight 1493 / (ascender 1901 + descender 483)); used to centre text on what the eye sees.
const CAP: f64 = 0.626;

/// plotters' SVG backend writes `font-size = size / 1.24`, while ab_glyph draws DejaVu at an em
/// of `size / 1.164` ((1901 + 483) / 2048); SVG text is enlarged by the ratio to match the PNG.
const SVG_FONT_SCALE: f64 = 1.24 / 1.164;

/// Supersampling factor for PNG output.
const SUPERSAMPLE: u32 = 2;

/// Reference figure size that the style constants below are tuned for.
const REF_W: f64 = 1600.0;
const REF_H: f64 = 1000.0;

// Style, in pixels of a 1600 x 1000 figure.
const FS_TICK: f64 = 30.0;
const FS_LABEL: f64 = 36.0;
const FS_TITLE: f64 = 38.0;
const FS_LEGEND: f64 = 30.0;
const FS_BAND: f64 = 28.0;
const FS_CAPTION: f64 = 24.0;
const TICK_LEN: f64 = 10.0;
const GAP: f64 = 12.0;
const PAD: f64 = 26.0;
const SPINE_W: f64 = 2.0;
const GRID_W: f64 = 1.5;
const ERRBAR_W: f64 = 3.0;
const CAP_HALF: f64 = 9.0;
const FAINT_ALPHA: f64 = 0.4;
/// Fraction of the data span added on each side when a range is not given (as matplotlib).
const AUTO_MARGIN: f64 = 0.05;

/// matplotlib's "tab10" palette: the colours researchers already read fluently.
pub const PALETTE: [Rgb; 10] = [
    Rgb(0x1f, 0x77, 0xb4), // tab:blue
    Rgb(0xff, 0x7f, 0x0e), // tab:orange
    Rgb(0x2c, 0xa0, 0x2c), // tab:green
    Rgb(0xd6, 0x27, 0x28), // tab:red
    Rgb(0x94, 0x67, 0xbd), // tab:purple
    Rgb(0x8c, 0x56, 0x4b), // tab:brown
    Rgb(0xe3, 0x77, 0xc2), // tab:pink
    Rgb(0x7f, 0x7f, 0x7f), // tab:gray
    Rgb(0xbc, 0xbd, 0x22), // tab:olive
    Rgb(0x17, 0xbe, 0xcf), // tab:cyan
];
const PALETTE_NAMES: [&str; 10] =
    ["blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan"];

const INK: Rgb = Rgb(0x22, 0x22, 0x22);
const GRID: Rgb = Rgb(0xe3, 0xe3, 0xe3);
const MUTED: Rgb = Rgb(0x55, 0x55, 0x55);

/// Why a figure could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The description is wrong; the message names the series and field.
    #[error("{0}")]
    Invalid(String),
    /// Drawing or writing the file failed.
    #[error("cannot write {path}: {message}")]
    Write { path: String, message: String },
}

fn invalid(msg: impl Into<String>) -> PlotError {
    PlotError::Invalid(msg.into())
}

/// An opaque colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rgb(pub u8, pub u8, pub u8);

impl Rgb {
    fn with_alpha(self, alpha: f64) -> RGBAColor {
        RGBAColor(self.0, self.1, self.2, alpha)
    }

    fn solid(self) -> RGBAColor {
        self.with_alpha(1.0)
    }
}

impl FromStr for Rgb {
    type Err = String;

    /// `#rrggbb`, `#rgb`, a tab10 name (`tab:blue` or `blue`), `black` or `white`.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        if let Some(hex) = t.strip_prefix('#') {
            return parse_hex(hex).ok_or_else(|| format!("'{s}' is not a #rrggbb colour"));
        }
        let name = t.strip_prefix("tab:").unwrap_or(&t);
        let name = if name == "grey" { "gray" } else { name };
        if let Some(i) = PALETTE_NAMES.iter().position(|n| *n == name) {
            return Ok(PALETTE[i]);
        }
        match name {
            "black" => Ok(Rgb(0, 0, 0)),
            "white" => Ok(Rgb(255, 255, 255)),
            _ => Err(format!("unknown colour '{s}': use #rrggbb or one of {}, black, white", PALETTE_NAMES.join(", "))),
        }
    }
}

fn parse_hex(hex: &str) -> Option<Rgb> {
    let digits: Vec<u8> = hex.chars().map(|c| c.to_digit(16).map(|d| d as u8)).collect::<Option<_>>()?;
    match digits.as_slice() {
        [r, g, b] => Some(Rgb(r * 17, g * 17, b * 17)),
        [r1, r2, g1, g2, b1, b2] => Some(Rgb(r1 * 16 + r2, g1 * 16 + g2, b1 * 16 + b2)),
        _ => None,
    }
}

/// How axis values map to positions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    Linear,
    /// Base 10; every value must be positive.
    Log,
    /// Linear within [-linthresh, linthresh], log10 outside: shows 0 next to 1, 10, 100.
    Symlog {
        linthresh: f64,
    },
}

impl Scale {
    /// Position of `v` on the axis, in "decades" for the log parts.
    ///
    /// Symlog: `v / c` for |v| <= c, else `sign(v) * (1 + log10(|v| / c))`; continuous at +-c,
    /// so [0, c] takes as much room as one decade.
    pub fn transform(self, v: f64) -> f64 {
        match self {
            Scale::Linear => v,
            Scale::Log => v.log10(),
            Scale::Symlog { linthresh: c } => {
                if v.abs() <= c {
                    v / c
                } else {
                    v.signum() * (1.0 + (v.abs() / c).log10())
                }
            }
        }
    }

    /// The value at axis position `t`; the inverse of [`Scale::transform`].
    pub fn inverse(self, t: f64) -> f64 {
        match self {
            Scale::Linear => t,
            Scale::Log => 10f64.powf(t),
            Scale::Symlog { linthresh: c } => {
                if t.abs() <= 1.0 {
                    t * c
                } else {
                    t.signum() * c * 10f64.powf(t.abs() - 1.0)
                }
            }
        }
    }

    /// Parses `linear`, `log` or `symlog` (with the given threshold).
    pub fn parse(name: &str, linthresh: f64) -> Result<Scale, String> {
        match name {
            "linear" => Ok(Scale::Linear),
            "log" => Ok(Scale::Log),
            "symlog" => Ok(Scale::Symlog { linthresh }),
            other => Err(format!("unknown scale '{other}': use linear, log or symlog")),
        }
    }
}

/// One axis: label, scale, optional range and explicit ticks.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub label: String,
    pub scale: Scale,
    /// (low, high) in data units; `None` fits the data with a 5 % margin.
    pub range: Option<(f64, f64)>,
    /// Tick positions; `None` picks round numbers (decades on log axes).
    pub ticks: Option<Vec<f64>>,
    /// One label per tick; `None` prints the tick values.
    pub tick_labels: Option<Vec<String>>,
}

impl Default for Axis {
    fn default() -> Self {
        Axis { label: String::new(), scale: Scale::Linear, range: None, ticks: None, tick_labels: None }
    }
}

/// Marker drawn at each point of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    Circle,
    Square,
    Triangle,
    Diamond,
    None,
}

impl FromStr for Marker {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "circle" => Ok(Marker::Circle),
            "square" => Ok(Marker::Square),
            "triangle" => Ok(Marker::Triangle),
            "diamond" => Ok(Marker::Diamond),
            "none" => Ok(Marker::None),
            other => Err(format!("unknown marker '{other}': use circle, square, triangle, diamond or none")),
        }
    }
}

/// The markers given to series that name none, in turn: shape tells series apart in greyscale.
const MARKER_CYCLE: [Marker; 4] = [Marker::Circle, Marker::Square, Marker::Triangle, Marker::Diamond];

/// How the points of a series are joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineStyle {
    Solid,
    Dashed,
    Dotted,
    None,
}

impl FromStr for LineStyle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "solid" => Ok(LineStyle::Solid),
            "dashed" => Ok(LineStyle::Dashed),
            "dotted" => Ok(LineStyle::Dotted),
            "none" => Ok(LineStyle::None),
            other => Err(format!("unknown line style '{other}': use solid, dashed, dotted or none")),
        }
    }
}

/// One line of the plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry; an empty name keeps the series out of the legend.
    pub name: String,
    pub x: Vec<f64>,
    pub y: Vec<f64>,
    /// Lower end of each error bar (an absolute y value, not a distance from y).
    pub yerr_low: Option<Vec<f64>>,
    /// Upper end of each error bar (an absolute y value).
    pub yerr_high: Option<Vec<f64>>,
    /// `None` takes the next palette colour.
    pub color: Option<Rgb>,
    /// `None` takes the next marker of circle, square, triangle, diamond.
    pub marker: Option<Marker>,
    pub line: LineStyle,
    /// Line width in pixels of a 1600 x 1000 figure.
    pub line_width: f64,
    /// Marker radius in pixels of a 1600 x 1000 figure.
    pub marker_size: f64,
    /// Extra points drawn faintly in the series' colour and marker (e.g. individual seeds).
    pub faint_x: Vec<f64>,
    pub faint_y: Vec<f64>,
}

impl Series {
    /// A solid line through `(x, y)` with default colour and marker.
    pub fn new(name: &str, x: Vec<f64>, y: Vec<f64>) -> Self {
        Series {
            name: name.to_string(),
            x,
            y,
            yerr_low: None,
            yerr_high: None,
            color: None,
            marker: None,
            line: LineStyle::Solid,
            line_width: 4.5,
            marker_size: 11.0,
            faint_x: Vec::new(),
            faint_y: Vec::new(),
        }
    }
}

/// A shaded stretch of the x axis, e.g. 10..25 "EM cliff".
#[derive(Debug, Clone, PartialEq)]
pub struct Band {
    pub from: f64,
    pub to: f64,
    /// Written at the top of the band.
    pub label: Option<String>,
    pub color: Rgb,
    pub alpha: f64,
}

impl Band {
    /// A light red band, as the study shaded its cliff.
    pub fn new(from: f64, to: f64, label: Option<String>) -> Self {
        Band { from, to, label, color: PALETTE[3], alpha: 0.12 }
    }
}

/// Where the legend goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Legend {
    /// The corner or edge that covers the fewest drawn points.
    Best,
    UpperRight,
    UpperLeft,
    LowerLeft,
    LowerRight,
    CenterRight,
    CenterLeft,
    LowerCenter,
    UpperCenter,
    Center,
    /// No legend.
    None,
}

/// Legend positions in the order "best" prefers them on a tie (matplotlib's order).
const LEGEND_ORDER: [Legend; 9] = [
    Legend::UpperRight,
    Legend::UpperLeft,
    Legend::LowerLeft,
    Legend::LowerRight,
    Legend::CenterRight,
    Legend::CenterLeft,
    Legend::LowerCenter,
    Legend::UpperCenter,
    Legend::Center,
];

impl FromStr for Legend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "best" => Legend::Best,
            "upper right" => Legend::UpperRight,
            "upper left" => Legend::UpperLeft,
            "lower left" => Legend::LowerLeft,
            "lower right" => Legend::LowerRight,
            "center right" => Legend::CenterRight,
            "center left" => Legend::CenterLeft,
            "lower center" => Legend::LowerCenter,
            "upper center" => Legend::UpperCenter,
            "center" => Legend::Center,
            "none" => Legend::None,
            other => {
                return Err(format!(
                    "unknown legend position '{other}': use best, upper right, upper left, lower left, \
                     lower right, center right, center left, lower center, upper center, center or none"
                ))
            }
        })
    }
}

/// A whole figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub title: Option<String>,
    /// A small grey note under the x label (N, what the bars are).
    pub caption: Option<String>,
    pub width: u32,
    pub height: u32,
    pub x: Axis,
    pub y: Axis,
    pub legend: Legend,
    pub series: Vec<Series>,
    pub bands: Vec<Band>,
}

impl Default for Figure {
    fn default() -> Self {
        Figure {
            title: None,
            caption: None,
            width: 1600,
            height: 1000,
            x: Axis::default(),
            y: Axis::default(),
            legend: Legend::Best,
            series: Vec::new(),
            bands: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation: every message names the series (by name, else by 1-based number) and the field.

fn series_ref(i: usize, s: &Series) -> String {
    if s.name.is_empty() {
        format!("series {}", i + 1)
    } else {
        format!("series '{}'", s.name)
    }
}

/// Every value finite; positions are 1-based as a Lua user counts them.
fn check_finite(owner: &str, field: &str, values: &[f64]) -> Result<(), PlotError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(invalid(format!("{owner}: {field}[{}] is {}", i + 1, values[i]))),
        None => Ok(()),
    }
}

/// On a log axis every value must be positive.
fn check_scale(owner: &str, field: &str, values: &[f64], scale: Scale) -> Result<(), PlotError> {
    if scale != Scale::Log {
        return Ok(());
    }
    match values.iter().position(|v| *v <= 0.0) {
        Some(i) => Err(invalid(format!(
            "{owner}: {field}[{}] = {} is not positive, which a log axis cannot show (a symlog axis can)",
            i + 1,
            values[i]
        ))),
        None => Ok(()),
    }
}

fn check_same_len(owner: &str, field: &str, values: &[f64], other: &str, n: usize) -> Result<(), PlotError> {
    if values.len() != n {
        return Err(invalid(format!("{owner}: {field} has {} values but {other} has {n}", values.len())));
    }
    Ok(())
}

impl Figure {
    /// Checks the whole description; the error names the series and field at fault.
    pub fn validate(&self) -> Result<(), PlotError> {
        if self.series.is_empty() {
            return Err(invalid("a figure needs at least one series"));
        }
        if !(16..=20_000).contains(&self.width) || !(16..=20_000).contains(&self.height) {
            return Err(invalid(format!(
                "figure size {}x{} is out of range (16..20000 pixels each way)",
                self.width, self.height
            )));
        }
        validate_axis("x axis", &self.x)?;
        validate_axis("y axis", &self.y)?;
        for (i, s) in self.series.iter().enumerate() {
            self.validate_series(&series_ref(i, s), s)?;
        }
        for (i, b) in self.bands.iter().enumerate() {
            self.validate_band(&format!("band {}", i + 1), b)?;
        }
        Ok(())
    }

    fn validate_series(&self, owner: &str, s: &Series) -> Result<(), PlotError> {
        if s.x.is_empty() {
            return Err(invalid(format!("{owner}: has no points (x is empty)")));
        }
        check_same_len(owner, "y", &s.y, "x", s.x.len())?;
        check_finite(owner, "x", &s.x)?;
        check_finite(owner, "y", &s.y)?;
        check_scale(owner, "x", &s.x, self.x.scale)?;
        check_scale(owner, "y", &s.y, self.y.scale)?;
        validate_error_bars(owner, s, self.y.scale)?;
        check_same_len(owner, "faint_y", &s.faint_y, "faint_x", s.faint_x.len())?;
        check_finite(owner, "faint_x", &s.faint_x)?;
        check_finite(owner, "faint_y", &s.faint_y)?;
        check_scale(owner, "faint_x", &s.faint_x, self.x.scale)?;
        check_scale(owner, "faint_y", &s.faint_y, self.y.scale)?;
        if !(s.line_width.is_finite() && s.line_width >= 0.0) {
            return Err(invalid(format!("{owner}: line_width must be >= 0, got {}", s.line_width)));
        }
        if !(s.marker_size.is_finite() && s.marker_size >= 0.0) {
            return Err(invalid(format!("{owner}: marker_size must be >= 0, got {}", s.marker_size)));
        }
        Ok(())
    }

    fn validate_band(&self, owner: &str, b: &Band) -> Result<(), PlotError> {
        check_finite(owner, "from/to", &[b.from, b.to])?;
        check_scale(owner, "from/to", &[b.from, b.to], self.x.scale)?;
        if b.from >= b.to {
            return Err(invalid(format!("{owner}: from ({}) must be below to ({})", b.from, b.to)));
        }
        if !(0.0..=1.0).contains(&b.alpha) {
            return Err(invalid(format!("{owner}: alpha must be within 0..1, got {}", b.alpha)));
        }
        Ok(())
    }
}

fn validate_axis(owner: &str, a: &Axis) -> Result<(), PlotError> {
    if let Scale::Symlog { linthresh } = a.scale {
        if !(linthresh.is_finite() && linthresh > 0.0) {
            return Err(invalid(format!("{owner}: linthresh must be positive, got {linthresh}")));
        }
    }
    if let Some((lo, hi)) = a.range {
        check_finite(owner, "range", &[lo, hi])?;
        check_scale(owner, "range", &[lo, hi], a.scale)?;
        if lo >= hi {
            return Err(invalid(format!("{owner}: range low ({lo}) must be below high ({hi})")));
        }
    }
    if let Some(ticks) = &a.ticks {
        check_finite(owner, "ticks", ticks)?;
        check_scale(owner, "ticks", ticks, a.scale)?;
    }
    match (&a.ticks, &a.tick_labels) {
        (Some(t), Some(l)) if t.len() != l.len() => {
            Err(invalid(format!("{owner}: tick_labels has {} labels but ticks has {}", l.len(), t.len())))
        }
        (None, Some(_)) => Err(invalid(format!("{owner}: tick_labels needs ticks to go with them"))),
        _ => Ok(()),
    }
}

/// Bars are absolute ends, both or neither, and must contain their point: a bar given as
/// distances (matplotlib's yerr) would otherwise be drawn silently in the wrong place.
fn validate_error_bars(owner: &str, s: &Series, scale: Scale) -> Result<(), PlotError> {
    let (low, high) = match (&s.yerr_low, &s.yerr_high) {
        (None, None) => return Ok(()),
        (Some(l), Some(h)) => (l, h),
        _ => return Err(invalid(format!("{owner}: give both yerr_low and yerr_high, or neither"))),
    };
    check_same_len(owner, "yerr_low", low, "y", s.y.len())?;
    check_same_len(owner, "yerr_high", high, "y", s.y.len())?;
    check_finite(owner, "yerr_low", low)?;
    check_finite(owner, "yerr_high", high)?;
    check_scale(owner, "yerr_low", low, scale)?;
    for (i, ((l, h), y)) in low.iter().zip(high).zip(&s.y).enumerate() {
        let tol = 1e-9 * y.abs().max(1.0);
        if *l > y + tol || *h < y - tol {
            return Err(invalid(format!(
                "{owner}: error bar {} ({l} .. {h}) does not contain y[{}] = {y}; yerr_low and \
                 yerr_high are the ends of the bar, not distances from y",
                i + 1,
                i + 1
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ticks.

/// Round tick values within [lo, hi] for a scale (lo < hi, in data units).
pub fn auto_ticks(scale: Scale, lo: f64, hi: f64) -> Vec<f64> {
    match scale {
        Scale::Linear => linear_ticks(lo, hi, 6),
        Scale::Log => log_ticks(lo, hi),
        Scale::Symlog { linthresh } => symlog_ticks(lo, hi, linthresh),
    }
}

/// Multiples of 1, 2, 2.5 or 5 x 10^k, about `target` of them.
fn linear_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let raw = (hi - lo) / target as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw * 0.999).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| clean(i as f64 * step, step)).collect()
}

/// Removes float noise (0.30000000000000004) at the precision the step implies.
fn clean(v: f64, step: f64) -> f64 {
    let digits = (-step.log10().floor() + 2.0).clamp(0.0, 15.0) as i32;
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Decades; with fewer than two in range, 1-2-5 steps.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let decades: Vec<f64> = (lo.log10().ceil() as i32..=hi.log10().floor() as i32).map(|k| 10f64.powi(k)).collect();
    if decades.len() >= 2 {
        let every = decades.len().div_ceil(8);
        return decades.into_iter().step_by(every).collect();
    }
    let mut out = Vec::new();
    for k in (lo.log10().floor() as i32)..=(hi.log10().ceil() as i32) {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(k);
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
    }
    out
}

/// 0 and +-c x 10^k.
fn symlog_ticks(lo: f64, hi: f64, c: f64) -> Vec<f64> {
    let mut out = Vec::new();
    for k in 0..=30 {
        let v = c * 10f64.powi(k);
        if v > hi.abs().max(lo.abs()) {
            break;
        }
        out.push(v);
        out.push(-v);
    }
    out.push(0.0);
    out.retain(|v| *v >= lo && *v <= hi);
    out.sort_by(|a, b| a.total_cmp(b));
    if out.len() < 2 {
        return linear_ticks(lo, hi, 6);
    }
    out
}

/// A tick value as people write it: 0, 25, 0.5, 1e-05.
pub fn format_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let a = v.abs();
    if (1e-4..1e6).contains(&a) {
        let s = format!("{v:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:e}")
    }
}

// ---------------------------------------------------------------------------------------------
// Layout: from data units to pixels.

/// One axis mapped onto a pixel interval.
#[derive(Debug, Clone)]
struct AxisMap {
    scale: Scale,
    /// The axis ends, in transformed units.
    t0: f64,
    t1: f64,
    /// The pixels the ends land on (for y, p0 is the bottom).
    p0: f64,
    p1: f64,
    ticks: Vec<(f64, String)>,
}

impl AxisMap {
    fn new(axis: &Axis, data: &[f64]) -> AxisMap {
        let (t0, t1) = axis_extent(axis, data);
        let ticks = resolve_ticks(axis, t0, t1);
        AxisMap { scale: axis.scale, t0, t1, p0: 0.0, p1: 1.0, ticks }
    }

    fn px(&self, v: f64) -> f64 {
        self.p0 + (self.scale.transform(v) - self.t0) / (self.t1 - self.t0) * (self.p1 - self.p0)
    }
}

/// The axis ends in transformed units: the given range, else the data plus a margin.
fn axis_extent(axis: &Axis, data: &[f64]) -> (f64, f64) {
    if let Some((lo, hi)) = axis.range {
        return (axis.scale.transform(lo), axis.scale.transform(hi));
    }
    let t: Vec<f64> = data.iter().map(|v| axis.scale.transform(*v)).collect();
    let lo = t.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = hi - lo;
    if span <= 0.0 || !span.is_finite() {
        let half = if lo.abs() > 0.0 { lo.abs() * 0.1 } else { 1.0 };
        return (lo - half, hi + half);
    }
    (lo - AUTO_MARGIN * span, hi + AUTO_MARGIN * span)
}

/// Explicit ticks (with labels, or their values printed) inside the axis, else round ones.
fn resolve_ticks(axis: &Axis, t0: f64, t1: f64) -> Vec<(f64, String)> {
    let inside = |v: f64| {
        let t = axis.scale.transform(v);
        t >= t0 - 1e-9 * (t1 - t0) && t <= t1 + 1e-9 * (t1 - t0)
    };
    match (&axis.ticks, &axis.tick_labels) {
        (Some(ticks), Some(labels)) => {
            ticks.iter().zip(labels).filter(|(v, _)| inside(**v)).map(|(v, l)| (*v, l.clone())).collect()
        }
        (Some(ticks), None) => ticks.iter().filter(|v| inside(**v)).map(|v| (*v, format_tick(*v))).collect(),
        _ => {
            let (lo, hi) = (axis.scale.inverse(t0), axis.scale.inverse(t1));
            auto_ticks(axis.scale, lo, hi).into_iter().map(|v| (v, format_tick(v))).collect()
        }
    }
}

/// Every x and every y the figure draws, so that auto ranges include them all.
fn data_extents(fig: &Figure) -> (Vec<f64>, Vec<f64>) {
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for s in &fig.series {
        xs.extend(&s.x);
        xs.extend(&s.faint_x);
        ys.extend(&s.y);
        ys.extend(&s.faint_y);
        ys.extend(s.yerr_low.iter().flatten());
        ys.extend(s.yerr_high.iter().flatten());
    }
    (xs, ys)
}

/// Pixel rectangle of the plotting area.
#[derive(Debug, Clone, Copy)]
struct Rect {
    left: f64,
    top: f64,
    right: f64,
    bottom: f64,
}

impl Rect {
    fn contains(&self, (x, y): (f64, f64)) -> bool {
        x >= self.left && x <= self.right && y >= self.top && y <= self.bottom
    }
}

// ---------------------------------------------------------------------------------------------
// Drawing.

/// Which backend draws: raster text needs its baseline placed by hand, SVG text is placed by
/// the viewer from anchors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextMode {
    Raster,
    Svg,
}

/// A drawing surface in absolute figure pixels, with the scale `k` (pixels per reference pixel).
struct Canvas<'a, DB: DrawingBackend> {
    area: &'a DrawingArea<DB, Shift>,
    origin: (f64, f64),
    k: f64,
    mode: TextMode,
}

type DrawResult = Result<(), String>;

fn drawn<T, E: fmt::Display>(r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

impl<DB: DrawingBackend> Canvas<'_, DB> {
    fn p(&self, (x, y): (f64, f64)) -> (i32, i32) {
        ((x - self.origin.0).round() as i32, (y - self.origin.1).round() as i32)
    }

    fn style(&self, color: RGBAColor, width: f64, filled: bool) -> ShapeStyle {
        ShapeStyle { color, filled, stroke_width: (width * self.k).round().max(1.0) as u32 }
    }

    /// A polyline; `width` in reference pixels.
    fn line(&self, pts: &[(f64, f64)], color: RGBAColor, width: f64, dash: LineStyle) -> DrawResult {
        let px: Vec<(i32, i32)> = pts.iter().map(|p| self.p(*p)).collect();
        let style = self.style(color, width, false);
        let w = width * self.k;
        match dash {
            LineStyle::None => Ok(()),
            LineStyle::Solid => drawn(self.area.draw(&PathElement::new(px, style))),
            LineStyle::Dashed => drawn(self.area.draw(&DashedPathElement::new(px, 3.5 * w, 2.0 * w, style))),
            LineStyle::Dotted => drawn(self.area.draw(&DashedPathElement::new(px, w, 1.5 * w, style))),
        }
    }

    fn rect(&self, a: (f64, f64), b: (f64, f64), color: RGBAColor, filled: bool, width: f64) -> DrawResult {
        drawn(self.area.draw(&Rectangle::new([self.p(a), self.p(b)], self.style(color, width, filled))))
    }

    /// A filled marker of radius `r` (reference pixels) centred on `c`.
    fn marker(&self, m: Marker, c: (f64, f64), r: f64, color: RGBAColor) -> DrawResult {
        let r = r * self.k;
        let (x, y) = c;
        let fill = self.style(color, 1.0, true);
        let poly = |pts: Vec<(f64, f64)>| {
            let px: Vec<(i32, i32)> = pts.into_iter().map(|p| self.p(p)).collect();
            drawn(self.area.draw(&Polygon::new(px, fill)))
        };
        match m {
            Marker::None => Ok(()),
            Marker::Circle => drawn(self.area.draw(&Circle::new(self.p(c), r.round() as i32, fill))),
            Marker::Square => {
                let h = r * 0.9;
                drawn(self.area.draw(&Rectangle::new([self.p((x - h, y - h)), self.p((x + h, y + h))], fill)))
            }
            Marker::Triangle => {
                poly(vec![(x, y - 1.25 * r), (x + 1.15 * r, y + 0.75 * r), (x - 1.15 * r, y + 0.75 * r)])
            }
            Marker::Diamond => poly(vec![(x, y - 1.3 * r), (x + r, y), (x, y + 1.3 * r), (x - r, y)]),
        }
    }

    /// The text style for reference size `size`, as this backend needs it.
    fn font(&self, size: f64, color: RGBAColor) -> TextStyle<'static> {
        let backend_scale = if self.mode == TextMode::Svg { SVG_FONT_SCALE } else { 1.0 };
        raster_font(size * self.k * backend_scale, color)
    }

    /// Width of `text` in pixels at reference size `size`.
    fn text_width(&self, text: &str, size: f64) -> f64 {
        let style = raster_font(size * self.k, INK.solid());
        self.area.estimate_text_size(text, &style).map(|(w, _)| w as f64).unwrap_or(0.0)
    }

    /// Draws `text` with its visible box (cap height, no descenders) anchored at `at`:
    /// `h` picks left/centre/right, `v` top/centre/baseline. `upright = false` turns it to
    /// read bottom to top, anchored the same way relative to the turned text.
    fn text(
        &self,
        text: &str,
        size: f64,
        color: Rgb,
        at: (f64, f64),
        anchor: (HPos, VPos),
        upright: bool,
    ) -> DrawResult {
        let (h, v) = anchor;
        let px = size * self.k;
        let style = self.font(size, color.solid());
        let style = if upright { style } else { style.transform(FontTransform::Rotate270) };
        let (x, y) = at;
        let (style, pos) = match self.mode {
            TextMode::Svg => (style.pos(Pos::new(h, v)), (x, y)),
            TextMode::Raster => {
                // ab_glyph puts the baseline at half the pixel size below the anchor.
                let shift = match v {
                    VPos::Top => CAP,
                    VPos::Center => CAP / 2.0,
                    VPos::Bottom => 0.0,
                } * px
                    - 0.5 * px;
                let pos = if upright { (x, y + shift) } else { (x + shift, y) };
                (style.pos(Pos::new(h, VPos::Top)), pos)
            }
        };
        let (ox, oy) = self.p(pos);
        drawn(self.area.draw_text(text, &style, (ox, oy)))
    }
}

impl Figure {
    /// Draws the figure to `path`: `.png` or `.svg`, written atomically, parent folders created.
    pub fn save(&self, path: &Path) -> Result<(), PlotError> {
        self.validate()?;
        register_font();
        let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        let write_err = |message: String| PlotError::Write { path: path.display().to_string(), message };
        match ext.as_str() {
            "png" => self.save_png(path).map_err(write_err),
            "svg" => self.save_svg(path).map_err(write_err),
            _ => Err(invalid(format!(
                "cannot tell the format of {}: the file name must end in .png or .svg",
                path.display()
            ))),
        }
    }

    /// Pixels per reference pixel at scale 1. Below the reference size text and lines shrink
    /// only with the square root of the figure, so a small figure stays readable.
    fn unit(&self) -> f64 {
        let ratio = (self.width as f64 / REF_W).min(self.height as f64 / REF_H);
        if ratio < 1.0 {
            ratio.sqrt()
        } else {
            ratio
        }
    }

    fn save_png(&self, path: &Path) -> Result<(), String> {
        let (w, h) = (self.width, self.height);
        let (sw, sh) = (w * SUPERSAMPLE, h * SUPERSAMPLE);
        let mut big = vec![255u8; (sw as usize) * (sh as usize) * 3];
        {
            let root = BitMapBackend::with_buffer(&mut big, (sw, sh)).into_drawing_area();
            render(self, &root, TextMode::Raster, self.unit() * SUPERSAMPLE as f64)?;
            drawn(root.present())?;
        }
        let small = downsample(&big, sw as usize, sh as usize, SUPERSAMPLE as usize);
        drawn(store::write_atomic_with(path, |tmp| {
            let mut backend = BitMapBackend::new(tmp, (w, h));
            backend.blit_bitmap((0, 0), (w, h), &small).map_err(std::io::Error::other)?;
            backend.present().map_err(std::io::Error::other)
        }))
    }

    fn save_svg(&self, path: &Path) -> Result<(), String> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (self.width, self.height)).into_drawing_area();
            render(self, &root, TextMode::Svg, self.unit())?;
            drawn(root.present())?;
        }
        drawn(store::write_atomic(path, svg.as_bytes()))
    }
}

/// The embedded font at `px` pixels (ab_glyph's scale), anchored top-left.
fn raster_font(px: f64, color: RGBAColor) -> TextStyle<'static> {
    TextStyle {
        font: FontDesc::new(FontFamily::Name(FONT_NAME), px, FontStyle::Normal),
        color: color.to_backend_color(),
        pos: Pos::new(HPos::Left, VPos::Top),
    }
}

/// Registers the embedded font with plotters once per process.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT_BYTES).is_err() {
            panic!("the embedded DejaVu Sans font does not parse");
        }
    });
}

/// Box filter: each output pixel is the mean of an f x f block of RGB pixels.
fn downsample(src: &[u8], w: usize, h: usize, f: usize) -> Vec<u8> {
    let (ow, oh) = (w / f, h / f);
    let mut out = vec![0u8; ow * oh * 3];
    let n = (f * f) as u32;
    for oy in 0..oh {
        for ox in 0..ow {
            for ch in 0..3 {
                let mut sum = 0u32;
                for dy in 0..f {
                    let row = (oy * f + dy) * w;
                    for dx in 0..f {
                        sum += src[(row + ox * f + dx) * 3 + ch] as u32;
                    }
                }
                out[(oy * ow + ox) * 3 + ch] = ((sum + n / 2) / n) as u8;
            }
        }
    }
    out
}

/// What each series looks like once defaults are filled in.
struct Look {
    color: Rgb,
    marker: Marker,
}

fn looks(fig: &Figure) -> Vec<Look> {
    fig.series
        .iter()
        .enumerate()
        .map(|(i, s)| Look {
            color: s.color.unwrap_or(PALETTE[i % PALETTE.len()]),
            marker: s.marker.unwrap_or(MARKER_CYCLE[i % MARKER_CYCLE.len()]),
        })
        .collect()
}

/// Lays out and draws the whole figure; `k` is pixels per reference pixel.
fn render<DB: DrawingBackend>(fig: &Figure, root: &DrawingArea<DB, Shift>, mode: TextMode, k: f64) -> DrawResult {
    drawn(root.fill(&WHITE))?;
    let canvas = Canvas { area: root, origin: (0.0, 0.0), k, mode };
    let (xs, ys) = data_extents(fig);
    let mut xmap = AxisMap::new(&fig.x, &xs);
    let mut ymap = AxisMap::new(&fig.y, &ys);
    let plot = layout(fig, &canvas, &xmap, &ymap);
    (xmap.p0, xmap.p1) = (plot.left, plot.right);
    (ymap.p0, ymap.p1) = (plot.bottom, plot.top);

    draw_grid(&canvas, plot, &xmap, &ymap)?;
    let (pw, ph) = ((plot.right - plot.left).round() as i32, (plot.bottom - plot.top).round() as i32);
    let inner = root.clone().shrink(((plot.left.round() as i32), (plot.top.round() as i32)), (pw, ph));
    let inside = Canvas { area: &inner, origin: (plot.left.round(), plot.top.round()), k, mode };
    draw_bands(&inside, fig, plot, &xmap)?;
    draw_axes(&canvas, plot, &xmap, &ymap)?;
    let looks = looks(fig);
    for (s, look) in fig.series.iter().zip(&looks) {
        draw_series(&inside, s, look, &xmap, &ymap)?;
    }
    draw_band_labels(&inside, fig, plot, &xmap)?;
    draw_legend(&inside, fig, &looks, plot, &xmap, &ymap)?;
    draw_titles(&canvas, fig, plot)?;
    Ok(())
}

/// The plotting rectangle: what is left once title, tick labels, axis labels and caption have
/// their room.
fn layout<DB: DrawingBackend>(fig: &Figure, c: &Canvas<DB>, xmap: &AxisMap, ymap: &AxisMap) -> Rect {
    let k = c.k;
    let (w, h) = (fig.width as f64 * k / fig.unit(), fig.height as f64 * k / fig.unit());
    let ytick_w = ymap.ticks.iter().map(|(_, l)| c.text_width(l, FS_TICK)).fold(0.0, f64::max);
    let ylabel = if fig.y.label.is_empty() { 0.0 } else { FS_LABEL + GAP };
    let left = PAD * k + ylabel * k + ytick_w + (GAP + TICK_LEN) * k;
    let xlabel = if fig.x.label.is_empty() { 0.0 } else { 1.5 * GAP + FS_LABEL };
    let caption = if fig.caption.is_some() { GAP + 1.2 * FS_CAPTION } else { 0.0 };
    let bottom = (TICK_LEN + GAP + 1.05 * FS_TICK + xlabel + caption + PAD) * k;
    let top = if fig.title.is_some() { PAD + FS_TITLE + 1.5 * GAP } else { PAD + FS_TICK / 2.0 } * k;
    // The last x tick label is centred on the axis end and must not be cut by the edge.
    let last_half = xmap.ticks.last().map(|(_, l)| c.text_width(l, FS_TICK) / 2.0).unwrap_or(0.0);
    let right = (1.6 * PAD * k).max(last_half + PAD * k * 0.5);
    Rect { left, top, right: w - right, bottom: h - bottom }
}

fn draw_grid<DB: DrawingBackend>(c: &Canvas<DB>, plot: Rect, xmap: &AxisMap, ymap: &AxisMap) -> DrawResult {
    let color = GRID.solid();
    for (v, _) in &xmap.ticks {
        let x = xmap.px(*v);
        c.line(&[(x, plot.top), (x, plot.bottom)], color, GRID_W, LineStyle::Solid)?;
    }
    for (v, _) in &ymap.ticks {
        let y = ymap.px(*v);
        c.line(&[(plot.left, y), (plot.right, y)], color, GRID_W, LineStyle::Solid)?;
    }
    Ok(())
}

fn draw_bands<DB: DrawingBackend>(c: &Canvas<DB>, fig: &Figure, plot: Rect, xmap: &AxisMap) -> DrawResult {
    for b in &fig.bands {
        let (x0, x1) = (xmap.px(b.from).max(plot.left), xmap.px(b.to).min(plot.right));
        if x1 <= x0 {
            continue;
        }
        c.rect((x0, plot.top), (x1, plot.bottom), b.color.with_alpha(b.alpha), true, 1.0)?;
        for x in [x0, x1] {
            c.line(&[(x, plot.top), (x, plot.bottom)], b.color.with_alpha(b.alpha * 2.0), 1.5, LineStyle::Solid)?;
        }
    }
    Ok(())
}

/// Where a band's label goes: centred at the top of the visible part of the band.
fn band_label_at(b: &Band, plot: Rect, xmap: &AxisMap, k: f64) -> Option<(f64, f64)> {
    b.label.as_ref()?;
    let (x0, x1) = (xmap.px(b.from).max(plot.left), xmap.px(b.to).min(plot.right));
    (x1 > x0).then_some(((x0 + x1) / 2.0, plot.top + GAP * k))
}

fn draw_band_labels<DB: DrawingBackend>(c: &Canvas<DB>, fig: &Figure, plot: Rect, xmap: &AxisMap) -> DrawResult {
    for b in &fig.bands {
        if let (Some(label), Some(at)) = (&b.label, band_label_at(b, plot, xmap, c.k)) {
            c.text(label, FS_BAND, MUTED, at, (HPos::Center, VPos::Top), true)?;
        }
    }
    Ok(())
}

/// Left and bottom spines with outward ticks and their labels (matplotlib's look without the
/// top and right spines, as in the study's figure).
fn draw_axes<DB: DrawingBackend>(c: &Canvas<DB>, plot: Rect, xmap: &AxisMap, ymap: &AxisMap) -> DrawResult {
    let k = c.k;
    let ink = INK.solid();
    c.line(&[(plot.left, plot.top), (plot.left, plot.bottom)], ink, SPINE_W, LineStyle::Solid)?;
    c.line(&[(plot.left, plot.bottom), (plot.right, plot.bottom)], ink, SPINE_W, LineStyle::Solid)?;
    let tick = TICK_LEN * k;
    for (v, label) in &xmap.ticks {
        let x = xmap.px(*v);
        c.line(&[(x, plot.bottom), (x, plot.bottom + tick)], ink, SPINE_W, LineStyle::Solid)?;
        c.text(label, FS_TICK, INK, (x, plot.bottom + tick + GAP * k), (HPos::Center, VPos::Top), true)?;
    }
    for (v, label) in &ymap.ticks {
        let y = ymap.px(*v);
        c.line(&[(plot.left - tick, y), (plot.left, y)], ink, SPINE_W, LineStyle::Solid)?;
        c.text(label, FS_TICK, INK, (plot.left - tick - GAP * k, y), (HPos::Right, VPos::Center), true)?;
    }
    Ok(())
}

fn draw_titles<DB: DrawingBackend>(c: &Canvas<DB>, fig: &Figure, plot: Rect) -> DrawResult {
    let k = c.k;
    let mid_x = (plot.left + plot.right) / 2.0;
    let xlabel_top = plot.bottom + (TICK_LEN + GAP + 1.05 * FS_TICK + 1.5 * GAP) * k;
    if !fig.x.label.is_empty() {
        c.text(&fig.x.label, FS_LABEL, INK, (mid_x, xlabel_top), (HPos::Center, VPos::Top), true)?;
    }
    if !fig.y.label.is_empty() {
        let x = PAD * k + FS_LABEL * k / 2.0;
        c.text(&fig.y.label, FS_LABEL, INK, (x, (plot.top + plot.bottom) / 2.0), (HPos::Center, VPos::Center), false)?;
    }
    if let Some(title) = &fig.title {
        c.text(title, FS_TITLE, INK, (mid_x, plot.top - 1.5 * GAP * k), (HPos::Center, VPos::Bottom), true)?;
    }
    if let Some(caption) = &fig.caption {
        let label_room = if fig.x.label.is_empty() { 0.0 } else { FS_LABEL + GAP };
        let y = xlabel_top + (label_room + GAP * 0.5) * k;
        c.text(caption, FS_CAPTION, MUTED, (mid_x, y), (HPos::Center, VPos::Top), true)?;
    }
    Ok(())
}

fn draw_series<DB: DrawingBackend>(
    c: &Canvas<DB>,
    s: &Series,
    look: &Look,
    xmap: &AxisMap,
    ymap: &AxisMap,
) -> DrawResult {
    let pts: Vec<(f64, f64)> = s.x.iter().zip(&s.y).map(|(x, y)| (xmap.px(*x), ymap.px(*y))).collect();
    let color = look.color.solid();
    for (x, y) in s.faint_x.iter().zip(&s.faint_y) {
        let at = (xmap.px(*x), ymap.px(*y));
        c.marker(look.marker, at, s.marker_size * 0.85, look.color.with_alpha(FAINT_ALPHA))?;
    }
    if pts.len() > 1 && s.line_width > 0.0 {
        c.line(&pts, color, s.line_width, s.line)?;
    }
    if let (Some(low), Some(high)) = (&s.yerr_low, &s.yerr_high) {
        let cap = CAP_HALF * c.k;
        for (i, (x, _)) in pts.iter().enumerate() {
            let (y0, y1) = (ymap.px(low[i]), ymap.px(high[i]));
            c.line(&[(*x, y0), (*x, y1)], color, ERRBAR_W, LineStyle::Solid)?;
            for y in [y0, y1] {
                c.line(&[(x - cap, y), (x + cap, y)], color, ERRBAR_W, LineStyle::Solid)?;
            }
        }
    }
    for p in &pts {
        c.marker(look.marker, *p, s.marker_size, color)?;
    }
    Ok(())
}

/// The legend's rows and box size, in pixels.
struct LegendBox {
    rows: Vec<usize>,
    width: f64,
    height: f64,
    row_h: f64,
    handle_w: f64,
    pad: f64,
}

fn legend_box<DB: DrawingBackend>(c: &Canvas<DB>, fig: &Figure) -> Option<LegendBox> {
    let rows: Vec<usize> = (0..fig.series.len()).filter(|i| !fig.series[*i].name.is_empty()).collect();
    if rows.is_empty() || fig.legend == Legend::None {
        return None;
    }
    let k = c.k;
    let text_w = rows.iter().map(|i| c.text_width(&fig.series[*i].name, FS_LEGEND)).fold(0.0, f64::max);
    let (pad, row_h, handle_w) = (GAP * k, 1.45 * FS_LEGEND * k, 2.0 * FS_LEGEND * k);
    let width = 2.0 * pad + handle_w + 0.4 * FS_LEGEND * k + text_w;
    let height = 2.0 * pad + row_h * rows.len() as f64 - 0.45 * FS_LEGEND * k;
    Some(LegendBox { rows, width, height, row_h, handle_w, pad })
}

/// Top-left corner of a legend of size (w, h) at `pos` inside `plot`, `inset` from its edges.
fn legend_corner(pos: Legend, plot: Rect, w: f64, h: f64, inset: f64) -> (f64, f64) {
    let left = plot.left + inset;
    let right = plot.right - inset - w;
    let hmid = (plot.left + plot.right - w) / 2.0;
    let top = plot.top + inset;
    let bottom = plot.bottom - inset - h;
    let vmid = (plot.top + plot.bottom - h) / 2.0;
    match pos {
        Legend::UpperRight | Legend::Best | Legend::None => (right, top),
        Legend::UpperLeft => (left, top),
        Legend::LowerLeft => (left, bottom),
        Legend::LowerRight => (right, bottom),
        Legend::CenterRight => (right, vmid),
        Legend::CenterLeft => (left, vmid),
        Legend::LowerCenter => (hmid, bottom),
        Legend::UpperCenter => (hmid, top),
        Legend::Center => (hmid, vmid),
    }
}

/// The position, in matplotlib's order of preference, whose box covers the fewest obstacles.
fn best_legend(plot: Rect, w: f64, h: f64, inset: f64, obstacles: &[(f64, f64)], margin: f64) -> Legend {
    let covered = |pos: Legend| {
        let (x0, y0) = legend_corner(pos, plot, w, h, inset);
        let r = Rect { left: x0 - margin, top: y0 - margin, right: x0 + w + margin, bottom: y0 + h + margin };
        obstacles.iter().filter(|p| r.contains(**p)).count()
    };
    let mut best = (usize::MAX, Legend::UpperRight);
    for pos in LEGEND_ORDER {
        let n = covered(pos);
        if n < best.0 {
            best = (n, pos);
        }
    }
    best.1
}

/// Every drawn point the legend should not hide: markers, bar ends, faint points, points along
/// each line, band labels.
fn obstacles(fig: &Figure, plot: Rect, xmap: &AxisMap, ymap: &AxisMap, k: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for s in &fig.series {
        let pts: Vec<(f64, f64)> = s.x.iter().zip(&s.y).map(|(x, y)| (xmap.px(*x), ymap.px(*y))).collect();
        out.extend(&pts);
        for pair in pts.windows(2) {
            let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
            let steps = (((x1 - x0).hypot(y1 - y0)) / (4.0 * k)).ceil().max(1.0) as usize;
            out.extend((1..steps).map(|i| {
                let t = i as f64 / steps as f64;
                (x0 + t * (x1 - x0), y0 + t * (y1 - y0))
            }));
        }
        for (i, x) in s.x.iter().enumerate() {
            for ends in [&s.yerr_low, &s.yerr_high].into_iter().flatten() {
                out.push((xmap.px(*x), ymap.px(ends[i])));
            }
        }
        out.extend(s.faint_x.iter().zip(&s.faint_y).map(|(x, y)| (xmap.px(*x), ymap.px(*y))));
    }
    for b in &fig.bands {
        if let Some((x, y)) = band_label_at(b, plot, xmap, k) {
            out.extend([(x, y), (x, y + FS_BAND * k)]);
        }
    }
    out
}

fn draw_legend<DB: DrawingBackend>(
    c: &Canvas<DB>,
    fig: &Figure,
    looks: &[Look],
    plot: Rect,
    xmap: &AxisMap,
    ymap: &AxisMap,
) -> DrawResult {
    let Some(lb) = legend_box(c, fig) else { return Ok(()) };
    let k = c.k;
    let inset = GAP * k;
    let pos = match fig.legend {
        Legend::Best => {
            let obs = obstacles(fig, plot, xmap, ymap, k);
            best_legend(plot, lb.width, lb.height, inset, &obs, 10.0 * k)
        }
        p => p,
    };
    let (x0, y0) = legend_corner(pos, plot, lb.width, lb.height, inset);
    c.rect((x0, y0), (x0 + lb.width, y0 + lb.height), RGBAColor(255, 255, 255, 0.9), true, 1.0)?;
    c.rect((x0, y0), (x0 + lb.width, y0 + lb.height), RGBAColor(0xcc, 0xcc, 0xcc, 1.0), false, 1.5)?;
    for (row, &i) in lb.rows.iter().enumerate() {
        let s = &fig.series[i];
        let look = &looks[i];
        let cy = y0 + lb.pad + row as f64 * lb.row_h + 0.5 * FS_LEGEND * k;
        let (hx0, hx1) = (x0 + lb.pad, x0 + lb.pad + lb.handle_w);
        if s.line_width > 0.0 {
            c.line(&[(hx0, cy), (hx1, cy)], look.color.solid(), s.line_width, s.line)?;
        }
        c.marker(look.marker, ((hx0 + hx1) / 2.0, cy), s.marker_size, look.color.solid())?;
        let tx = hx1 + 0.4 * FS_LEGEND * k;
        c.text(&s.name, FS_LEGEND, INK, (tx, cy), (HPos::Left, VPos::Center), true)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_series() -> Figure {
        let mut em = Series::new("EM", vec![0.0, 1.0, 10.0, 25.0], vec![82.1, 82.5, 59.3, 0.7]);
        em.yerr_low = Some(vec![77.6, 78.0, 53.5, 0.0]);
        em.yerr_high = Some(vec![86.6, 87.0, 65.1, 1.7]);
        em.faint_x = vec![10.0, 10.0];
        em.faint_y = vec![44.3, 54.6];
        let benign = Series::new("benign", vec![10.0, 25.0], vec![40.4, 26.8]);
        Figure {
            title: Some("Marker survival".into()),
            caption: Some("N = 280 per point".into()),
            width: 480,
            height: 300,
            x: Axis { label: "steps".into(), scale: Scale::Symlog { linthresh: 1.0 }, ..Axis::default() },
            y: Axis { label: "rate (%)".into(), ..Axis::default() },
            series: vec![em, benign],
            bands: vec![Band::new(10.0, 25.0, Some("cliff".into()))],
            ..Figure::default()
        }
    }

    fn message(fig: &Figure) -> String {
        fig.validate().unwrap_err().to_string()
    }

    #[test]
    fn symlog_is_linear_inside_the_threshold_and_logarithmic_outside() {
        let s = Scale::Symlog { linthresh: 1.0 };
        assert_eq!(s.transform(0.0), 0.0);
        assert_eq!(s.transform(0.5), 0.5);
        assert_eq!(s.transform(1.0), 1.0);
        assert!((s.transform(10.0) - 2.0).abs() < 1e-12);
        assert!((s.transform(-100.0) + 3.0).abs() < 1e-12);
        let wide = Scale::Symlog { linthresh: 5.0 };
        assert!((wide.transform(50.0) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn every_scale_round_trips_through_its_inverse() {
        for scale in [Scale::Linear, Scale::Log, Scale::Symlog { linthresh: 2.0 }] {
            for v in [0.3, 1.0, 2.0, 7.5, 375.0] {
                let back = scale.inverse(scale.transform(v));
                assert!((back - v).abs() < 1e-9 * v, "{scale:?} {v} -> {back}");
            }
        }
    }

    #[test]
    fn linear_ticks_are_round_numbers() {
        assert_eq!(linear_ticks(-3.0, 95.0, 6), vec![0.0, 20.0, 40.0, 60.0, 80.0]);
        assert_eq!(linear_ticks(0.0, 1.0, 6), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
    }

    #[test]
    fn symlog_ticks_are_zero_and_decades() {
        assert_eq!(symlog_ticks(-0.2, 400.0, 1.0), vec![0.0, 1.0, 10.0, 100.0]);
    }

    #[test]
    fn log_ticks_fall_back_to_one_two_five_within_a_decade() {
        assert_eq!(log_ticks(1.5, 9.0), vec![2.0, 5.0]);
        assert_eq!(log_ticks(0.5, 2000.0), vec![1.0, 10.0, 100.0, 1000.0]);
    }

    #[test]
    fn tick_labels_read_as_people_write_them() {
        assert_eq!(format_tick(0.0), "0");
        assert_eq!(format_tick(375.0), "375");
        assert_eq!(format_tick(0.1 + 0.2), "0.3");
        assert_eq!(format_tick(-2.5), "-2.5");
        assert_eq!(format_tick(1e-5), "1e-5");
    }

    #[test]
    fn colours_parse_from_hex_and_tab10_names() {
        assert_eq!("#1f77b4".parse::<Rgb>().unwrap(), PALETTE[0]);
        assert_eq!("tab:orange".parse::<Rgb>().unwrap(), Rgb(0xff, 0x7f, 0x0e));
        assert_eq!("#fff".parse::<Rgb>().unwrap(), Rgb(255, 255, 255));
        assert!("mauve".parse::<Rgb>().unwrap_err().contains("unknown colour 'mauve'"));
        assert!("#12345".parse::<Rgb>().is_err());
    }

    #[test]
    fn a_figure_without_series_is_rejected() {
        let fig = Figure::default();
        assert!(message(&fig).contains("at least one series"));
    }

    #[test]
    fn mismatched_lengths_name_the_series_and_field() {
        let mut fig = two_series();
        fig.series[1].y.pop();
        let m = message(&fig);
        assert!(m.contains("series 'benign'") && m.contains("y has 1 values but x has 2"), "{m}");
    }

    #[test]
    fn nan_is_rejected_with_its_position() {
        let mut fig = two_series();
        fig.series[0].y[2] = f64::NAN;
        let m = message(&fig);
        assert!(m.contains("series 'EM': y[3] is NaN"), "{m}");
    }

    #[test]
    fn a_non_positive_x_on_a_log_axis_is_rejected() {
        let mut fig = two_series();
        fig.x.scale = Scale::Log;
        let m = message(&fig);
        assert!(m.contains("series 'EM': x[1] = 0 is not positive"), "{m}");
        assert!(m.contains("symlog"), "{m}");
    }

    #[test]
    fn error_bars_given_as_distances_are_caught() {
        let mut fig = two_series();
        fig.series[1].yerr_low = Some(vec![5.0, 5.0]);
        fig.series[1].yerr_high = Some(vec![5.0, 5.0]);
        let m = message(&fig);
        assert!(m.contains("series 'benign'") && m.contains("not distances"), "{m}");
    }

    #[test]
    fn tick_labels_must_match_ticks_in_number() {
        let mut fig = two_series();
        fig.x.ticks = Some(vec![0.0, 1.0, 10.0]);
        fig.x.tick_labels = Some(vec!["base".into(), "1".into()]);
        assert!(message(&fig).contains("tick_labels has 2 labels but ticks has 3"));
    }

    #[test]
    fn an_unnamed_series_is_named_by_its_number() {
        let mut fig = two_series();
        fig.series[1].name.clear();
        fig.series[1].x.push(3.0);
        assert!(message(&fig).starts_with("series 2:"));
    }

    #[test]
    fn the_auto_range_includes_every_drawn_value_with_a_margin() {
        let axis = Axis::default();
        let (t0, t1) = axis_extent(&axis, &[0.0, 100.0]);
        assert_eq!((t0, t1), (-5.0, 105.0));
        let fixed = Axis { range: Some((0.0, 1.0)), ..Axis::default() };
        assert_eq!(axis_extent(&fixed, &[5.0]), (0.0, 1.0));
    }

    #[test]
    fn the_best_legend_position_avoids_the_data() {
        let plot = Rect { left: 0.0, top: 0.0, right: 100.0, bottom: 100.0 };
        // Data fills the upper right corner only.
        let obs: Vec<(f64, f64)> = (0..10).map(|i| (90.0 - i as f64, 5.0 + i as f64)).collect();
        assert_eq!(best_legend(plot, 30.0, 20.0, 2.0, &obs, 1.0), Legend::UpperLeft);
        assert_eq!(best_legend(plot, 30.0, 20.0, 2.0, &[], 1.0), Legend::UpperRight);
    }

    #[test]
    fn downsampling_averages_blocks() {
        let src = [0, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255];
        assert_eq!(downsample(&src, 2, 2, 2), vec![128, 128, 128]);
    }

    #[test]
    fn a_png_and_an_svg_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let fig = two_series();
        let png = dir.path().join("sub/fig.png");
        let svg = dir.path().join("fig.svg");
        fig.save(&png).unwrap();
        fig.save(&svg).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 2000, "{} bytes", bytes.len());
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("<svg") && text.contains("Marker survival") && text.contains("cliff"));
    }

    #[test]
    fn an_unknown_extension_is_an_error_that_names_the_formats() {
        let err = two_series().save(Path::new("fig.jpg")).unwrap_err().to_string();
        assert!(err.contains(".png or .svg"), "{err}");
    }
}
