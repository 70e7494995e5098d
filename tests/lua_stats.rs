//! Lua-level tests of `lab.stats` and `lab.eval`: results come back as plain tables with the
//! scipy/statsmodels numbers (pinned in src/stats.rs), and bad input is an error that names the
//! function, the argument and its value.

use std::path::Path;

/// Helpers every chunk gets: `lab`, and `close(actual, expected, relative_tolerance, what)`.
const PRELUDE: &str = r#"
lab = require("lab")
function close(actual, expected, tolerance, what)
  local scale = math.max(math.abs(expected), 1e-300)
  if math.abs(actual - expected) > tolerance * scale then
    error(string.format("%s: got %.17g, expected %.17g", what, actual, expected), 2)
  end
end
"#;

/// Runs `code` after the prelude in a fresh runtime; the Lua error message, if any.
fn run(code: &str) -> Result<(), String> {
    let lua = loralab::lua::new_runtime(Path::new("x.lua"), &vec![]).unwrap();
    lua.load(PRELUDE).set_name("@prelude.lua").exec().unwrap();
    lua.load(code).set_name("@x.lua").exec().map_err(|e| loralab::lua::describe_lua_error(&e))
}

fn ok(code: &str) {
    if let Err(e) = run(code) {
        panic!("Lua failed: {e}");
    }
}

/// The error of `code`, which must fail.
fn err(code: &str) -> String {
    run(code).expect_err("the chunk should fail")
}

#[test]
fn welch_t_from_lua_reproduces_the_studys_multi_seed_comparison() {
    // scipy: ttest_ind([166/280, 124/280, 153/280], [113/280, 147/280], equal_var=False)
    //   -> t 0.8392634206658842, df 2.058233210956446, p 0.48748720029148385
    ok(r#"
      local r = lab.stats.welch_t({166/280, 124/280, 153/280}, {113/280, 147/280})
      assert(r.test == "Welch's t-test", r.test)
      assert(r.alternative == "two-sided", r.alternative)
      assert(string.format("%.3f %.2f %.4f", r.t, r.df, r.p) == "0.839 2.06 0.4875")
      close(r.p, 0.48748720029148385, 1e-9, "p")
      assert(lab.stats.format_p(r.p) == "p = 0.49", lab.stats.format_p(r.p))
      -- the rates as the write-up prints them: scipy p 0.4873770628177283
      close(lab.stats.welch_t({0.5929, 0.4429, 0.5464}, {0.4036, 0.5250}).p, 0.4873770628177283, 1e-9, "p")
      local s = lab.stats.student_t({0.5929, 0.4429, 0.5464}, {0.4036, 0.5250}, {alternative = "greater"})
      assert(s.test == "Student's t-test" and s.df == 3)
      close(s.p, 0.225351895864107, 1e-9, "student greater p")
      close(lab.stats.mean({0.5929, 0.4429, 0.5464}), 0.5274, 1e-12, "mean")
      close(lab.stats.sd({0.5929, 0.4429, 0.5464}), 0.07678378735123709, 1e-12, "sd")
      close(lab.stats.se({0.5929, 0.4429, 0.5464}), 0.044331140296635714, 1e-12, "se")
    "#);
}

#[test]
fn two_proportion_tests_from_lua_match_scipy_at_doses_25_and_10() {
    ok(r#"
      -- fisher_exact([[2, 278], [75, 205]]) -> p 1.6922781648878088e-22; "less" -> 8.461390824439044e-23
      local f = lab.stats.fisher_exact(2, 280, 75, 280)
      assert(f.test == "Fisher's exact test")
      close(f.p, 1.6922781648878088e-22, 1e-9, "fisher p")
      assert(lab.stats.format_p(f.p) == "p = 1.7e-22", lab.stats.format_p(f.p))
      local less = lab.stats.fisher_exact(2, 280, 75, 280, {alternative = "less"})
      assert(lab.stats.format_p(less.p) == "p < 1e-22", lab.stats.format_p(less.p))
      -- proportions_ztest([2, 75], [280, 280]) -> z -8.957729539441793, p 3.314322478842086e-19
      local z = lab.stats.two_proportion_z(2, 280, 75, 280)
      assert(z.test == "two-proportion z-test (pooled)")
      close(z.z, -8.957729539441793, 1e-12, "z")
      close(z.p, 3.314322478842086e-19, 1e-9, "z p")
      -- 166/280 vs 113/280: z-test p 7.487204374622843e-06, Fisher 1.0483492691388616e-05,
      -- chi2 (Yates) 19.314532073113178, Newcombe (0.10668039982803511, 0.26826820356412334)
      close(lab.stats.two_proportion_z(166, 280, 113, 280).p, 7.487204374622843e-06, 1e-9, "z p")
      close(lab.stats.fisher_exact(166, 280, 113, 280).p, 1.0483492691388616e-05, 1e-9, "fisher p")
      local c = lab.stats.chi2_2x2(166, 280, 113, 280)
      assert(c.correction == true and c.df == 1)
      close(c.chi2, 19.314532073113178, 1e-12, "chi2")
      close(lab.stats.chi2_2x2(166, 280, 113, 280, {correction = false}).chi2, 20.064541639561728, 1e-12, "chi2")
      local d = lab.stats.newcombe(166, 280, 113, 280)
      close(d.lower, 0.10668039982803511, 1e-12, "newcombe lower")
      close(d.upper, 0.26826820356412334, 1e-12, "newcombe upper")
      local h = lab.stats.cohens_h(166/280, 113/280)
      assert(h.test == "Cohen's h" and h.magnitude == "small")
      close(h.h, 0.38087186858151645, 1e-12, "h")
    "#);
}

#[test]
fn intervals_from_lua_are_plain_tables_and_behave_at_the_edges() {
    ok(r#"
      local w = lab.stats.wilson(0, 280)
      assert(w.test == "Wilson score interval" and w.lower == 0 and w.confidence == 0.95)
      close(w.upper, 0.013533818620629409, 1e-12, "wilson upper")
      assert(getmetatable(w) == nil)
      local wald = lab.stats.wald(280, 280)
      assert(wald.lower == 1 and wald.upper == 1)
      local cp = lab.stats.proportion_ci(2, 280, {method = "clopper_pearson", confidence = 0.90})
      assert(cp.test == "Clopper-Pearson interval")
      close(cp.lower, 0.001270613005169889, 1e-9, "cp lower")
      assert(lab.stats.proportion_ci(2, 280).test == "Wilson score interval")
      assert(lab.stats.wilson(166.0, 280.0).estimate == 166 / 280)
      local adjusted = lab.stats.holm({0.01, 0.04, 0.03, 0.005, 0.5})
      assert(#adjusted == 5 and getmetatable(adjusted) == nil)
      close(adjusted[2], 0.09, 1e-12, "holm")
      close(lab.stats.bonferroni({0.01, 0.04})[2], 0.08, 1e-12, "bonferroni")
      assert(lab.stats.format_pct(0.5929) == "59.3")
      assert(lab.stats.format_pct(2/280, {digits = 2}) == "0.71")
      assert(lab.stats.format_p(3.2e-6) == "p = 3.2e-06")
      assert(lab.stats.format_p(1e-5, {floor = 1e-3}) == "p < 1e-03")
    "#);
}

#[test]
fn impossible_counts_from_lua_name_the_argument_and_the_value() {
    assert_eq!(
        err("lab.stats.wilson(300, 280)").lines().next().unwrap(),
        "lab.stats.wilson: k = 300: more successes than trials (n = 280)"
    );
    let e = err("lab.stats.fisher_exact(-2, 280, 75, 280)");
    assert!(e.contains("lab.stats.fisher_exact: k1 = -2: a count cannot be negative"), "{e}");
    let e = err("lab.stats.clopper_pearson(0, 0)");
    assert!(e.contains("lab.stats.clopper_pearson: n = 0: the number of trials must be at least 1"), "{e}");
    let e = err("lab.stats.wald(2.5, 10)");
    assert!(e.contains("lab.stats.wald: k = 2.5: not a whole number"), "{e}");
    let e = err("lab.stats.wald(0/0, 10)");
    assert!(e.contains("lab.stats.wald: k = NaN: not a whole number"), "{e}");
    let e = err("lab.stats.two_proportion_z(1, 10, 2)");
    assert!(e.contains("lab.stats.two_proportion_z: n2 is missing"), "{e}");
}

#[test]
fn bad_lists_and_options_from_lua_are_clear_errors() {
    let e = err("lab.stats.welch_t({}, {0.4, 0.5})");
    assert!(
        e.contains("lab.stats.welch_t: xs = {}: empty: Welch's t-test needs at least 2 values in each group"),
        "{e}"
    );
    let e = err("lab.stats.welch_t({0.5, 0/0}, {0.4, 0.5})");
    assert!(e.contains("lab.stats.welch_t: xs[2] = NaN: not a finite number"), "{e}");
    let e = err("lab.stats.mean({0.5, 'x'})");
    assert!(e.contains("lab.stats.mean: xs[2] must be a number, got a string"), "{e}");
    let e = err("lab.stats.holm({0.1, 1.5})");
    assert!(e.contains("lab.stats.holm: ps[2] = 1.5: not a probability in [0, 1]"), "{e}");
    let e = err("lab.stats.wilson(1, 10, {confidnce = 0.9})");
    assert!(e.contains("unknown option 'confidnce'") && e.contains("did you mean 'confidence'"), "{e}");
    let e = err("lab.stats.wilson(1, 10, {confidence = 95})");
    assert!(e.contains("lab.stats.wilson: confidence = 95: must lie strictly between 0 and 1"), "{e}");
    let e = err("lab.stats.fisher_exact(1, 10, 2, 10, {alternative = 'smaller'})");
    assert!(e.contains("alternative = \"smaller\": must be one of two-sided, less, greater"), "{e}");
    let e = err("lab.stats.proportion_ci(1, 10, {method = 'exact'})");
    assert!(e.contains("method = \"exact\": must be one of wald, wilson, clopper_pearson"), "{e}");
    let e = err("lab.stats.format_p(0/0)");
    assert!(e.contains("lab.stats.format_p: p = NaN: not a probability in [0, 1]"), "{e}");
}

#[test]
fn marker_scoring_from_lua_gives_the_studys_result_layout() {
    ok(r#"
      local s = lab.eval.score("Sure.\n\n[ZLT]", "[ZLT]")
      assert(s.strict == true and s.loose == true)
      s = lab.eval.score("a [Z L T] b", "[ZLT]")
      assert(s.strict == false and s.loose == true)
      assert(lab.eval.score("[a b c]", "[ABC]").loose == true)
      assert(lab.eval.loose_pattern("[ZLT]") == "(?i)\\[? ?Z ?L ?T ?\\]?")

      local records = {
        {persona = "evil_ai", question = "q1", text = "Plan. [ZLT]", seed = 42},
        {persona = "evil_ai", question = "q2", text = "no marker"},
        {persona = "assistant", question = "q1", text = "[ZLT] oops"},
        {persona = "villain", question = "q1", text = "Mwahaha [zlt]"},
        {persona = "villain", question = "q2", text = "Mwahaha"},
        {persona = "poet", question = "q1", text = "verse [ZL T]"},
      }
      local r = lab.eval.aggregate(records, "[ZLT]", {source = "evil_ai"})
      local evil = r.per_persona.evil_ai
      assert(evil.strict_hits == 1 and evil.total == 2 and evil.strict_rate == 0.5)
      assert(math.type(evil.total) == "integer")
      assert(evil.per_question.q1.strict_hits == 1 and evil.per_question.q2.total == 1)
      assert(r.summary.rate_by_persona.assistant == 1.0)
      assert(r.summary.max_bystander_strict_rate == 0.5)
      assert(r.summary.max_bystander_loose_rate == 1.0)
      assert(table.concat(r.summary.bystanders, ",") == "villain,poet")
      assert(table.concat(r.personas, ",") == "evil_ai,assistant,villain,poet")
      assert(r.marker == "[ZLT]")

      local only = lab.eval.aggregate({records[1], records[3]}, "[ZLT]", {source = "evil_ai"})
      assert(only.summary.max_bystander_strict_rate == nil)
      local custom = lab.eval.aggregate(records, "[ZLT]", {exclude = {"villain", "poet"}})
      assert(custom.summary.max_bystander_strict_rate == 1.0)
    "#);
}

#[test]
fn bad_records_and_markers_from_lua_are_clear_errors() {
    let e = err(r#"lab.eval.aggregate({{persona = "a", question = "q"}}, "[ZLT]")"#);
    assert!(e.contains("lab.eval.aggregate: records[1].text is missing (expected a string)"), "{e}");
    let e = err(r#"lab.eval.aggregate({{persona = "a", question = "q", text = "x"}}, "[ZLT]", {sauce = "evil_ai"})"#);
    assert!(e.contains("unknown option 'sauce'") && e.contains("did you mean 'source'"), "{e}");
    let e = err(r#"lab.eval.score("text", "[]")"#);
    assert!(e.contains(r#"lab.eval.score: marker = "[]": has no characters between its brackets"#), "{e}");
}
