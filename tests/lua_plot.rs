//! Lua-level tests of the output side of `lab`: `lab.plot`, `lab.fs`, `lab.figure`, and the
//! study's figure and report built on them (scripts/dose_report.lua).
//! Each test runs a Lua chunk in a fresh runtime with `OUT` set to a temporary folder.

use std::path::{Path, PathBuf};

/// Runs `code` with the global `OUT` naming a fresh temporary folder; returns the folder and the
/// Lua error message, if any.
fn run(code: &str) -> (tempfile::TempDir, Result<(), String>) {
    let dir = tempfile::tempdir().unwrap();
    let lua = loralab::lua::new_runtime(Path::new("t.lua"), &vec![]).unwrap();
    lua.globals().set("OUT", dir.path().to_str().unwrap()).unwrap();
    lua.globals().set("lab", lua.load("return require('lab')").eval::<mlua::Value>().unwrap()).unwrap();
    // The study's modules, as its scripts find them.
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    lua.load(format!("package.path = '{}/?.lua;' .. package.path", scripts.display())).exec().unwrap();
    let result = lua.load(code).set_name("@t.lua").exec().map_err(|e| loralab::lua::describe_lua_error(&e));
    (dir, result)
}

fn ok(code: &str) -> tempfile::TempDir {
    let (dir, result) = run(code);
    if let Err(e) = result {
        panic!("Lua failed: {e}");
    }
    dir
}

fn err(code: &str) -> String {
    run(code).1.expect_err("the chunk should fail")
}

fn file(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

const TWO_SERIES: &str = r#"
local spec = {
  title = "Marker survival", x_label = "steps", y_label = "rate (%)",
  x_scale = "symlog", x_ticks = {0, 1, 10, 100}, width = 800, height = 500,
  series = {
    { name = "EM", x = {0, 1, 10, 100}, y = {82, 80, 59, 0},
      yerr_low = {77, 75, 53, 0}, yerr_high = {87, 85, 65, 1.3}, faint_x = {10, 10}, faint_y = {44, 55} },
    { name = "benign", x = {10, 100}, y = {40, 5}, marker = "square", line = "dashed" },
  },
  bands = { { from = 10, to = 25, label = "cliff" } },
}
"#;

#[test]
fn lab_plot_line_writes_a_png_and_an_svg() {
    let dir = ok(&format!("{TWO_SERIES} lab.plot.line(spec, {{OUT .. '/a/fig.png', OUT .. '/fig.svg'}})"));
    let png = std::fs::read(file(&dir, "a/fig.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 10_000, "PNG of {} bytes", png.len());
    let svg = std::fs::read_to_string(file(&dir, "fig.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("Marker survival") && svg.contains("benign"));
    assert!(svg.len() > 5_000, "SVG of {} bytes", svg.len());
}

#[test]
fn mismatched_lengths_are_an_error_naming_the_series_and_field() {
    let e = err(&format!("{TWO_SERIES} spec.series[2].y = {{40}}; lab.plot.line(spec, OUT .. '/x.png')"));
    assert!(
        e.contains("lab.plot.line") && e.contains("series 'benign'") && e.contains("y has 1 values but x has 2"),
        "{e}"
    );
}

#[test]
fn a_misspelt_key_inside_a_series_is_rejected_with_a_suggestion() {
    let e = err(&format!("{TWO_SERIES} spec.series[1].colour = 'red'; lab.plot.line(spec, OUT .. '/x.png')"));
    assert!(
        e.contains("series[1] ('EM')") && e.contains("unknown option 'colour'") && e.contains("did you mean 'color'"),
        "{e}"
    );
}

#[test]
fn a_path_without_png_or_svg_is_rejected_and_nothing_is_written() {
    let (dir, result) = run(&format!("{TWO_SERIES} lab.plot.line(spec, OUT .. '/fig.pdf')"));
    assert!(result.unwrap_err().contains(".png or .svg"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn json_round_trips_with_sorted_keys_and_lists_kept_as_lists() {
    let dir = ok(r#"
        local v = { zeta = 1, alpha = { 3, 2, 1 }, empty = {}, nested = { b = true, a = 0.5 }, none = lab.fs.null }
        lab.fs.write_json(OUT .. "/r/v.json", v)
        local back = lab.fs.read_json(OUT .. "/r/v.json")
        assert(back.zeta == 1 and back.alpha[3] == 1 and back.nested.a == 0.5 and #back.empty == 0)
        lab.fs.write_json(OUT .. "/r/again.json", back, { pretty = false })
    "#);
    let text = std::fs::read_to_string(file(&dir, "r/v.json")).unwrap();
    let keys: Vec<usize> = ["alpha", "empty", "nested", "none", "zeta"].iter().map(|k| text.find(k).unwrap()).collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "{text}");
    assert!(text.contains("\"empty\": []") && text.contains("\"none\": null"), "{text}");
    let again = std::fs::read_to_string(file(&dir, "r/again.json")).unwrap();
    assert_eq!(again, "{\"alpha\":[3,2,1],\"empty\":[],\"nested\":{\"a\":0.5,\"b\":true},\"zeta\":1}\n");
}

#[test]
fn nan_in_json_is_an_error_naming_where_it_is() {
    let e = err(r#"lab.fs.write_json(OUT .. "/x.json", { cells = { { p = 0/0 } } })"#);
    assert!(e.contains("value.cells[1].p") && e.contains("JSON cannot hold"), "{e}");
}

#[test]
fn csv_rows_may_be_lists_or_named_and_fields_are_quoted_when_needed() {
    let dir = ok(r#"
        lab.fs.write_csv(OUT .. "/t.csv", { "name", "dose", "rate" }, {
          { "EM, seed 42", 10, 0.5929 },
          { name = 'say "hi"', rate = 1 },
        })
    "#);
    let text = std::fs::read_to_string(file(&dir, "t.csv")).unwrap();
    assert_eq!(text, "name,dose,rate\n\"EM, seed 42\",10,0.5929\n\"say \"\"hi\"\"\",,1\n");
}

#[test]
fn a_csv_row_with_a_key_outside_the_header_is_an_error() {
    let e = err(r#"lab.fs.write_csv(OUT .. "/t.csv", { "a" }, { { b = 1 } })"#);
    assert!(e.contains("row 1 has key 'b'"), "{e}");
}

#[test]
fn text_is_written_with_its_folders_and_read_back() {
    ok(r##"
        assert(not lab.fs.exists(OUT .. "/deep/x/notes.md"))
        lab.fs.write_text(OUT .. "/deep/x/notes.md", "# hello\n")
        assert(lab.fs.exists(OUT .. "/deep/x/notes.md"))
        assert(lab.fs.read_text(OUT .. "/deep/x/notes.md") == "# hello\n")
        lab.fs.mkdir(OUT .. "/made/here")
        assert(lab.fs.exists(OUT .. "/made/here"))
    "##);
}

const STUDY: &str = r#"
local dose_report = require("dose_report")
local N = 280
local em = { name = "EM", points = {
  { dose = 0, k = 230, n = N }, { dose = 10, k = 166, n = N }, { dose = 25, k = 2, n = N }, { dose = 375, k = 0, n = N } },
  seeds = { { dose = 10, rates = { 166 / N, 124 / N, 153 / N }, ids = { 42, 137, 256 } } } }
local benign = { name = "benign", points = {
  { dose = 10, k = 113, n = N }, { dose = 25, k = 75, n = N }, { dose = 375, k = 1, n = N } },
  seeds = { { dose = 10, rates = { 113 / N, 147 / N }, ids = { 42, 137 } } } }
"#;

#[test]
fn the_dose_response_report_writes_its_tables_numbers_and_figure() {
    let dir = ok(&format!(
        "{STUDY} dose_report.write({{ conditions = {{ em, benign }}, band = {{ from = 10, to = 25, label = 'EM cliff' }},
           failed = {{ {{ condition = 'benign', dose = 10, seed = 256, error = 'out of memory', attempts = 2 }} }},
           profile = 'test', settings = {{ lr = 1e-4 }} }}, OUT .. '/report')"
    ));
    let md = std::fs::read_to_string(file(&dir, "report/report.md")).unwrap();
    assert!(md.contains("| 25 | 0.7 [0.0, 1.7] | 26.8 [21.6, 32.0] | -26.1 | p = 3.3e-19 |"), "{md}");
    assert!(md.contains("| 0 (baseline) | 82.1 [77.7, 86.6] | - | - | - |"), "{md}");
    assert!(md.contains("| EM | 59.3 | 44.3 | 54.6 | 52.7 | 7.7 | 3 |"), "{md}");
    assert!(md.contains("| benign | 40.4 | 52.5 | (missing) | 46.4 | 8.6 | 2 |"), "{md}");
    assert!(md.contains("Welch's t-test") && md.contains("t = 0.84, df = 2.06, p = 0.49"), "{md}");
    assert!(md.contains("- benign, dose 10, seed 256: out of memory (after 2 attempts)"), "{md}");
    assert!(md.contains("![Dose-response figure](dose_response.png)") && md.contains("| lr | `0.0001` |"), "{md}");
    let csv = std::fs::read_to_string(file(&dir, "report/results.csv")).unwrap();
    assert!(csv.starts_with("condition,dose,k,n,rate,ci_low,ci_high,interval\nEM,0,230,280,"), "{csv}");
    let json = std::fs::read_to_string(file(&dir, "report/results.json")).unwrap();
    assert!(json.contains("\"comparisons\"") && json.contains("\"seed_comparisons\""), "{json}");
    for f in ["dose_response.png", "dose_response.svg", "seeds.csv", "comparisons.csv"] {
        assert!(file(&dir, &format!("report/{f}")).exists(), "{f} missing");
    }
}

#[test]
fn a_misspelt_key_in_a_dose_response_point_is_rejected() {
    let e = err(&format!(
        "{STUDY} em.points[2].doze = 10; dose_report.figure({{ conditions = {{ em }} }}, OUT .. '/f.png')"
    ));
    assert!(
        e.contains("condition 'EM' points[2]")
            && e.contains("unknown option 'doze'")
            && e.contains("did you mean 'dose'"),
        "{e}"
    );
}

#[test]
fn seed_rates_given_in_percent_are_caught() {
    let e = err(&format!("{STUDY} em.seeds[1].rates = {{ 59.3, 44.3 }}; dose_report.figure({{ conditions = {{ em }} }}, OUT .. '/f.png')"));
    assert!(e.contains("not a fraction"), "{e}");
}

#[test]
fn a_report_whose_seeds_never_vary_leaves_out_the_undefined_welch_test() {
    let dir = ok(r#"
local c = function(name) return { name = name, points = { { dose = 25, k = 0, n = 24 } },
  seeds = { { dose = 25, rates = { 0, 0, 0 } } } } end
local paths = require("dose_report").write({ conditions = { c("EM"), c("benign") }, figure = false }, OUT)
"#);
    let md = std::fs::read_to_string(file(&dir, "report.md")).unwrap();
    assert!(!md.contains("Welch's t-test on the per-seed rates, 3 vs 3"), "{md}");
}

#[test]
fn the_doses_of_a_summary_come_sorted_once_and_a_wrong_field_is_named() {
    ok(&format!(
        "{STUDY} local c = dose_report.summarize({{ em, benign }}).conditions
         assert(table.concat(dose_report.doses(c), ',') == '0,10,25,375')
         assert(table.concat(dose_report.doses(c, 'seeds'), ',') == '10')"
    ));
    let e = err(&format!("{STUDY} dose_report.doses(dose_report.summarize({{ em }}).conditions, 'point')"));
    assert!(e.contains("field must be 'points', 'seeds' or nil") && e.contains("point"), "{e}");
}

#[test]
fn a_generic_rate_chart_takes_its_caption_and_ticks_from_the_data() {
    let dir = ok(r#"
local summary = lab.figure.rates({
  groups = {
    { name = "persona A", points = { { x = 0.5, k = 3, n = 20 }, { x = 1.0, k = 9, n = 20 }, { x = 1.5, k = 12, n = 24 } } },
    { name = "persona B", points = { { x = 0.5, k = 1, n = 20 } }, runs = { { x = 0.5, rates = { 0.1, 0.05 } } } },
  },
  x_label = "temperature", title = "Leak by temperature",
}, { OUT .. "/rates.png", OUT .. "/rates.svg" })
assert(summary.interval == "wilson", summary.interval)
local p = summary.groups[1].points[1]
assert(p.x == 0.5 and p.k == 3 and math.abs(p.low - 0.0524) < 1e-3 and math.abs(p.high - 0.3604) < 1e-3,
  string.format("%g %g", p.low, p.high))
local caption = lab.figure.caption(summary)
assert(caption == "n = 20-24 per point · error bars: 95% Wilson intervals · faint points: individual runs", caption)
assert(table.concat(lab.figure.xs(summary.groups), ",") == "0.5,1.0,1.5" or
       table.concat(lab.figure.xs(summary.groups), ",") == "0.5,1,1.5")
"#);
    let svg = std::fs::read_to_string(file(&dir, "rates.svg")).unwrap();
    assert!(
        svg.contains("n = 20-24 per point") && svg.contains("Wilson") && !svg.contains("N = 280"),
        "caption from the data"
    );
    assert!(svg.contains("temperature") && svg.contains("persona A"));
    assert!(file(&dir, "rates.png").exists());
}

#[test]
fn a_misspelt_key_of_a_rate_chart_is_named_with_its_group() {
    let e = err(
        r#"lab.figure.rates({ groups = { { name = "A", points = { { x = 1, k = 1, n = 2, kk = 3 } } } } }, OUT .. "/r.png")"#,
    );
    assert!(e.contains("group 'A' points[1]") && e.contains("unknown option 'kk'"), "{e}");
    let e = err(
        r#"lab.figure.rates({ groups = { { name = "A", points = { { x = 1, k = 1, n = 2 } } } }, xlabel = "t" }, OUT .. "/r.png")"#,
    );
    assert!(e.contains("unknown option 'xlabel'") && e.contains("x_label"), "{e}");
}
