//! Statistics for marker rates: intervals for one proportion, tests comparing two proportions,
//! t-tests across seeds, multiple-comparison adjustment, and the formatting used in reports.
//!
//! Pure Rust, no Lua (`lua::stats` wraps it as `lab.stats`). Every function states its formula
//! and the paper it comes from; the unit tests pin the numbers to scipy/statsmodels.
//!
//! Conventions:
//! - A proportion is `k` successes out of `n` trials. Counts are `i64` so that a negative count
//!   coming from a script is reported as such instead of wrapping around.
//! - Degenerate counts are answered, not refused: `k = 0` and `k = n` give intervals that touch
//!   0 or 1, and two arms that are both all-0 or both all-1 give "no difference" (`p = 1`).
//!   Only impossible input is an error: `n = 0`, `k < 0`, `k > n`, NaN, empty lists.
//! - Every result struct says which procedure produced it in its `test` field.
//! - `alternative` follows scipy: `two-sided`, `less` (first group smaller), `greater`.

use std::fmt::Display;

use serde::Serialize;
use statrs::distribution::{Beta, ChiSquared, ContinuousCDF, Normal, StudentsT};
use statrs::function::factorial::ln_binomial;

/// Confidence level of an interval when none is given.
pub const DEFAULT_CONFIDENCE: f64 = 0.95;

/// Significant digits of [`format_p`] when none are given.
pub const DEFAULT_P_DIGITS: usize = 2;

/// Below this [`format_p`] writes `p < 1e-22` instead of a number. Smaller p-values add nothing
/// to a report: the model behind them (independent completions) is far rougher than that.
pub const DEFAULT_P_FLOOR: f64 = 1e-22;

/// Decimals of [`format_pct`] when none are given (59.3 %).
pub const DEFAULT_PCT_DIGITS: usize = 1;

/// Relative tolerance under which two tables of Fisher's test count as equally likely, so that
/// rounding cannot drop a tied table from the two-sided sum (the rule of R's `fisher.test`).
const FISHER_TIE_TOLERANCE: f64 = 1e-7;

// ------------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------------

/// Bad input, named by argument and value: `k = 300: more successes than trials (n = 280)`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{argument} = {value}: {problem}")]
pub struct StatsError {
    /// The argument's name as the caller wrote it (`k`, `n1`, `xs`, `ps[3]`, `confidence`).
    pub argument: String,
    /// The offending value, printed.
    pub value: String,
    /// What is wrong with it.
    pub problem: String,
}

impl StatsError {
    fn new(argument: impl Into<String>, value: impl Display, problem: impl Into<String>) -> Self {
        StatsError { argument: argument.into(), value: value.to_string(), problem: problem.into() }
    }
}

pub type Result<T> = std::result::Result<T, StatsError>;

/// A distribution that could not be built from parameters checked earlier (should not happen).
fn distribution<T, E: Display>(built: std::result::Result<T, E>, what: &str) -> Result<T> {
    built.map_err(|e| StatsError::new(what, "(internal)", format!("invalid distribution: {e}")))
}

// ------------------------------------------------------------------------------------------------
// Argument checks
// ------------------------------------------------------------------------------------------------

/// `k` successes out of `n` trials: `n >= 1`, `0 <= k <= n`.
fn check_count(k_name: &str, k: i64, n_name: &str, n: i64) -> Result<()> {
    if n < 1 {
        return Err(StatsError::new(n_name, n, "the number of trials must be at least 1"));
    }
    if k < 0 {
        return Err(StatsError::new(k_name, k, "a count cannot be negative"));
    }
    if k > n {
        return Err(StatsError::new(k_name, k, format!("more successes than trials ({n_name} = {n})")));
    }
    Ok(())
}

/// A confidence level strictly between 0 and 1.
fn check_confidence(confidence: f64) -> Result<()> {
    if confidence.is_nan() || confidence <= 0.0 || confidence >= 1.0 {
        return Err(StatsError::new("confidence", confidence, "must lie strictly between 0 and 1"));
    }
    Ok(())
}

/// A probability in [0, 1].
fn check_probability(name: &str, p: f64) -> Result<()> {
    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return Err(StatsError::new(name, p, "not a probability in [0, 1]"));
    }
    Ok(())
}

/// Every value finite, at least `min_len` of them (`why` says who needs them).
fn check_sample(name: &str, xs: &[f64], min_len: usize, why: &str) -> Result<()> {
    for (i, x) in xs.iter().enumerate() {
        if !x.is_finite() {
            return Err(StatsError::new(format!("{name}[{}]", i + 1), x, "not a finite number"));
        }
    }
    if xs.len() < min_len {
        let what = if xs.is_empty() { "empty".to_string() } else { format!("{} value(s)", xs.len()) };
        return Err(StatsError::new(name, show_list(xs), format!("{what}: {why}")));
    }
    Ok(())
}

/// A list as Lua would write it, shortened: `{0.59, 0.44}`.
fn show_list(xs: &[f64]) -> String {
    const SHOWN: usize = 6;
    let mut items: Vec<String> = xs.iter().take(SHOWN).map(|x| x.to_string()).collect();
    if xs.len() > SHOWN {
        items.push(format!("... ({} in all)", xs.len()));
    }
    format!("{{{}}}", items.join(", "))
}

// ------------------------------------------------------------------------------------------------
// Alternatives and the normal quantile
// ------------------------------------------------------------------------------------------------

/// The alternative hypothesis, named as in scipy. `Less` means the first group is smaller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Alternative {
    #[default]
    TwoSided,
    Less,
    Greater,
}

impl Alternative {
    /// The accepted names, in the order they are documented.
    pub const NAMES: [&'static str; 3] = ["two-sided", "less", "greater"];

    /// Parses `two-sided`, `less` or `greater`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "two-sided" => Ok(Alternative::TwoSided),
            "less" => Ok(Alternative::Less),
            "greater" => Ok(Alternative::Greater),
            _ => Err(StatsError::new(
                "alternative",
                format!("\"{name}\""),
                format!("must be one of {}", Self::NAMES.join(", ")),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Alternative::TwoSided => "two-sided",
            Alternative::Less => "less",
            Alternative::Greater => "greater",
        }
    }

    /// The p-value from the two tail probabilities of the observed statistic,
    /// `lower = P(T <= t)` and `upper = P(T >= t)`; two-sided doubles the smaller tail
    /// (right for the symmetric null distributions of z and t).
    fn p_value(self, lower: f64, upper: f64) -> f64 {
        match self {
            Alternative::TwoSided => (2.0 * lower.min(upper)).min(1.0),
            Alternative::Less => lower,
            Alternative::Greater => upper,
        }
    }
}

/// `z` with `P(|Z| <= z) = confidence` for a standard normal Z (1.959964 at 0.95).
fn two_sided_z(confidence: f64) -> f64 {
    Normal::standard().inverse_cdf(1.0 - (1.0 - confidence) / 2.0)
}

// ------------------------------------------------------------------------------------------------
// One proportion: intervals
// ------------------------------------------------------------------------------------------------

/// A confidence interval around `estimate`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Interval {
    /// The method, e.g. "Wilson score interval".
    pub test: &'static str,
    pub estimate: f64,
    pub lower: f64,
    pub upper: f64,
    pub confidence: f64,
}

/// The interval methods of [`proportion_interval`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntervalMethod {
    Wald,
    Wilson,
    ClopperPearson,
}

impl IntervalMethod {
    pub const NAMES: [&'static str; 3] = ["wald", "wilson", "clopper_pearson"];

    /// Parses `wald`, `wilson` or `clopper_pearson`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "wald" => Ok(IntervalMethod::Wald),
            "wilson" => Ok(IntervalMethod::Wilson),
            "clopper_pearson" => Ok(IntervalMethod::ClopperPearson),
            _ => Err(StatsError::new(
                "method",
                format!("\"{name}\""),
                format!("must be one of {}", Self::NAMES.join(", ")),
            )),
        }
    }
}

/// The interval for `k` out of `n` by `method`.
pub fn proportion_interval(k: i64, n: i64, method: IntervalMethod, confidence: f64) -> Result<Interval> {
    match method {
        IntervalMethod::Wald => wald_interval(k, n, confidence),
        IntervalMethod::Wilson => wilson_interval(k, n, confidence),
        IntervalMethod::ClopperPearson => clopper_pearson_interval(k, n, confidence),
    }
}

/// Wald interval, clamped to [0, 1]: `p ± z sqrt(p (1 - p) / n)` with `p = k / n` and `z` the
/// two-sided normal quantile of `confidence` (Laplace 1812; the interval of the study's figure).
///
/// Zero width at `k = 0` and `k = n`, and too narrow near them: prefer [`wilson_interval`].
pub fn wald_interval(k: i64, n: i64, confidence: f64) -> Result<Interval> {
    check_count("k", k, "n", n)?;
    check_confidence(confidence)?;
    let p = k as f64 / n as f64;
    let half = two_sided_z(confidence) * (p * (1.0 - p) / n as f64).sqrt();
    Ok(Interval {
        test: "Wald interval",
        estimate: p,
        lower: (p - half).clamp(0.0, 1.0),
        upper: (p + half).clamp(0.0, 1.0),
        confidence,
    })
}

/// Wilson score interval (Wilson 1927, JASA 22:209), the inversion of the score test:
///
/// `centre = (k + z²/2) / (n + z²)`, `half = z / (n + z²) · sqrt(k (n - k) / n + z²/4)`.
///
/// At `k = 0` the lower end is exactly 0, at `k = n` the upper end exactly 1.
pub fn wilson_interval(k: i64, n: i64, confidence: f64) -> Result<Interval> {
    check_count("k", k, "n", n)?;
    check_confidence(confidence)?;
    let (lower, upper) = wilson_bounds(k, n, two_sided_z(confidence));
    Ok(Interval { test: "Wilson score interval", estimate: k as f64 / n as f64, lower, upper, confidence })
}

/// The Wilson bounds for checked counts (shared with [`newcombe_interval`]).
fn wilson_bounds(k: i64, n: i64, z: f64) -> (f64, f64) {
    let (k, n) = (k as f64, n as f64);
    let z2 = z * z;
    let centre = (k + z2 / 2.0) / (n + z2);
    let half = z / (n + z2) * (k * (n - k) / n + z2 / 4.0).sqrt();
    let lower = if k == 0.0 { 0.0 } else { (centre - half).max(0.0) };
    let upper = if k == n { 1.0 } else { (centre + half).min(1.0) };
    (lower, upper)
}

/// Clopper-Pearson "exact" interval (Clopper & Pearson 1934, Biometrika 26:404), from the beta
/// quantiles with `α = 1 - confidence`:
///
/// `lower = B(α/2; k, n - k + 1)` (0 when `k = 0`), `upper = B(1 - α/2; k + 1, n - k)` (1 when `k = n`).
pub fn clopper_pearson_interval(k: i64, n: i64, confidence: f64) -> Result<Interval> {
    check_count("k", k, "n", n)?;
    check_confidence(confidence)?;
    let alpha = 1.0 - confidence;
    let (kf, nf) = (k as f64, n as f64);
    let lower = if k == 0 { 0.0 } else { distribution(Beta::new(kf, nf - kf + 1.0), "beta")?.inverse_cdf(alpha / 2.0) };
    let upper =
        if k == n { 1.0 } else { distribution(Beta::new(kf + 1.0, nf - kf), "beta")?.inverse_cdf(1.0 - alpha / 2.0) };
    Ok(Interval { test: "Clopper-Pearson interval", estimate: kf / nf, lower, upper, confidence })
}

// ------------------------------------------------------------------------------------------------
// Two proportions
// ------------------------------------------------------------------------------------------------

/// Checks both arms of a two-proportion comparison.
fn check_two(k1: i64, n1: i64, k2: i64, n2: i64) -> Result<()> {
    check_count("k1", k1, "n1", n1)?;
    check_count("k2", k2, "n2", n2)
}

/// Result of [`two_proportion_z`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZTest {
    pub test: &'static str,
    pub z: f64,
    pub p: f64,
    pub alternative: Alternative,
    /// `k1 / n1` and `k2 / n2`.
    pub p1: f64,
    pub p2: f64,
    /// `(k1 + k2) / (n1 + n2)`.
    pub pooled: f64,
}

/// Pooled two-proportion z-test, the score test for two binomials (textbook form, e.g. Fleiss,
/// Levin & Paik 2003, Statistical Methods for Rates and Proportions, ch. 2):
///
/// `z = (p1 - p2) / sqrt(p̂ (1 - p̂) (1/n1 + 1/n2))` with the pooled `p̂ = (k1 + k2) / (n1 + n2)`,
/// p-value from the standard normal. Equals the uncorrected 2x2 chi-square test (`z² = χ²`).
///
/// When `p̂` is 0 or 1 (both arms all-0 or all-1) the arms are identical: `z = 0`, `p = 1`
/// (statsmodels returns NaN there).
pub fn two_proportion_z(k1: i64, n1: i64, k2: i64, n2: i64, alternative: Alternative) -> Result<ZTest> {
    check_two(k1, n1, k2, n2)?;
    let (p1, p2) = (k1 as f64 / n1 as f64, k2 as f64 / n2 as f64);
    let pooled = (k1 + k2) as f64 / (n1 + n2) as f64;
    let variance = pooled * (1.0 - pooled) * (1.0 / n1 as f64 + 1.0 / n2 as f64);
    let (z, p) = if variance > 0.0 {
        let z = (p1 - p2) / variance.sqrt();
        let normal = Normal::standard();
        (z, alternative.p_value(normal.cdf(z), normal.sf(z)))
    } else {
        (0.0, 1.0)
    };
    Ok(ZTest { test: "two-proportion z-test (pooled)", z, p, alternative, p1, p2, pooled })
}

/// Result of [`fisher_exact`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FisherExact {
    pub test: &'static str,
    /// Sample odds ratio `k1 (n2 - k2) / ((n1 - k1) k2)`, as scipy reports it: infinite when the
    /// denominator is 0, NaN when a row or column of the table is empty.
    pub odds_ratio: f64,
    pub p: f64,
    pub alternative: Alternative,
}

/// The law of the top-left cell of a 2x2 table given its margins (hypergeometric).
struct TableLaw {
    row1: u64,
    row2: u64,
    col1: u64,
}

impl TableLaw {
    /// `P(X = x) = C(row1, x) C(row2, col1 - x) / C(row1 + row2, col1)`, in logs so that tables
    /// with probabilities like 1e-25 keep their digits.
    fn pmf(&self, x: u64) -> f64 {
        let ln = ln_binomial(self.row1, x) + ln_binomial(self.row2, self.col1 - x)
            - ln_binomial(self.row1 + self.row2, self.col1);
        ln.exp()
    }

    /// The possible values of the top-left cell.
    fn support(&self) -> std::ops::RangeInclusive<u64> {
        self.col1.saturating_sub(self.row2)..=self.col1.min(self.row1)
    }
}

/// Fisher's exact test of a 2x2 table (Fisher 1922, JRSS 85:87; Fisher 1935):
///
/// | | success | failure |
/// |---|---|---|
/// | arm 1 | k1 | n1 - k1 |
/// | arm 2 | k2 | n2 - k2 |
///
/// Given the margins, the top-left cell X is hypergeometric. `less`: `P(X <= k1)`;
/// `greater`: `P(X >= k1)`; `two-sided`: the sum of `P(X = x)` over all tables no more likely
/// than the observed one (within a relative 1e-7, R's rule for ties). Same alternatives as
/// scipy's `fisher_exact([[k1, n1-k1], [k2, n2-k2]])`. The tail is summed term by term, not as
/// `1 - cdf`, so p-values far below 1e-16 stay exact.
pub fn fisher_exact(k1: i64, n1: i64, k2: i64, n2: i64, alternative: Alternative) -> Result<FisherExact> {
    check_two(k1, n1, k2, n2)?;
    let (a, b, c, d) = (k1 as u64, (n1 - k1) as u64, k2 as u64, (n2 - k2) as u64);
    let law = TableLaw { row1: a + b, row2: c + d, col1: a + c };
    let observed = law.pmf(a);
    let p: f64 = match alternative {
        Alternative::Less => law.support().filter(|&x| x <= a).map(|x| law.pmf(x)).sum(),
        Alternative::Greater => law.support().filter(|&x| x >= a).map(|x| law.pmf(x)).sum(),
        Alternative::TwoSided => {
            law.support().map(|x| law.pmf(x)).filter(|&px| px <= observed * (1.0 + FISHER_TIE_TOLERANCE)).sum()
        }
    };
    Ok(FisherExact {
        test: "Fisher's exact test",
        odds_ratio: sample_odds_ratio(a, b, c, d),
        p: p.min(1.0),
        alternative,
    })
}

/// `a d / (b c)`, with scipy's conventions for empty margins and zero denominators.
fn sample_odds_ratio(a: u64, b: u64, c: u64, d: u64) -> f64 {
    if a + c == 0 || b + d == 0 {
        f64::NAN
    } else if b > 0 && c > 0 {
        (a as f64 * d as f64) / (b as f64 * c as f64)
    } else {
        f64::INFINITY
    }
}

/// Result of [`chi2_2x2`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChiSquare {
    pub test: &'static str,
    pub chi2: f64,
    pub df: i64,
    pub p: f64,
    /// Whether Yates' continuity correction was applied.
    pub correction: bool,
}

/// Pearson's chi-square test of a 2x2 table (Pearson 1900), with or without Yates' continuity
/// correction (Yates 1934, JRSS Suppl. 1:217):
///
/// `χ² = Σ (|O - E| - c)² / E` over the four cells, `E = row total × column total / N`,
/// `c = min(0.5, |O - E|)` with the correction and 0 without; p from χ² with 1 degree of
/// freedom. Matches scipy's `chi2_contingency(table, correction=...)`.
///
/// A table with an empty column (both arms all-0 or all-1) has `χ² = 0`, `p = 1` (scipy refuses
/// it: an expected count is 0).
pub fn chi2_2x2(k1: i64, n1: i64, k2: i64, n2: i64, correction: bool) -> Result<ChiSquare> {
    check_two(k1, n1, k2, n2)?;
    let test = if correction { "chi-square test (2x2, Yates' correction)" } else { "chi-square test (2x2)" };
    let observed = [[k1 as f64, (n1 - k1) as f64], [k2 as f64, (n2 - k2) as f64]];
    let rows = [n1 as f64, n2 as f64];
    let cols = [(k1 + k2) as f64, (n1 + n2 - k1 - k2) as f64];
    let total = (n1 + n2) as f64;
    if cols.contains(&0.0) {
        return Ok(ChiSquare { test, chi2: 0.0, df: 1, p: 1.0, correction });
    }
    let mut chi2 = 0.0;
    for (i, row) in rows.iter().enumerate() {
        for (j, col) in cols.iter().enumerate() {
            let expected = row * col / total;
            let gap = (observed[i][j] - expected).abs();
            let shrink = if correction { gap.min(0.5) } else { 0.0 };
            chi2 += (gap - shrink).powi(2) / expected;
        }
    }
    let p = distribution(ChiSquared::new(1.0), "chi-square")?.sf(chi2);
    Ok(ChiSquare { test, chi2, df: 1, p, correction })
}

/// Newcombe's hybrid score interval for `p1 - p2` (Newcombe 1998, Stat. Med. 17:873, method 10),
/// built from the Wilson intervals `(l1, u1)`, `(l2, u2)` of each arm at the same confidence:
///
/// `lower = d - sqrt((p1 - l1)² + (u2 - p2)²)`, `upper = d + sqrt((u1 - p1)² + (p2 - l2)²)`,
/// `d = p1 - p2`. statsmodels: `confint_proportions_2indep(..., method="newcomb")`.
pub fn newcombe_interval(k1: i64, n1: i64, k2: i64, n2: i64, confidence: f64) -> Result<Interval> {
    check_two(k1, n1, k2, n2)?;
    check_confidence(confidence)?;
    let z = two_sided_z(confidence);
    let (p1, p2) = (k1 as f64 / n1 as f64, k2 as f64 / n2 as f64);
    let (l1, u1) = wilson_bounds(k1, n1, z);
    let (l2, u2) = wilson_bounds(k2, n2, z);
    let d = p1 - p2;
    Ok(Interval {
        test: "Newcombe hybrid score interval (method 10)",
        estimate: d,
        lower: d - ((p1 - l1).powi(2) + (u2 - p2).powi(2)).sqrt(),
        upper: d + ((u1 - p1).powi(2) + (p2 - l2).powi(2)).sqrt(),
        confidence,
    })
}

/// Result of [`cohens_h`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CohensH {
    pub test: &'static str,
    pub h: f64,
    /// Cohen's label for `|h|`: "negligible" (< 0.2), "small", "medium" (>= 0.5), "large" (>= 0.8).
    pub magnitude: &'static str,
}

/// Cohen's h, the effect size of two proportions (Cohen 1988, Statistical Power Analysis, §6.2):
/// `h = 2 asin(sqrt(p1)) - 2 asin(sqrt(p2))`. statsmodels: `proportion_effectsize(p1, p2)`.
pub fn cohens_h(p1: f64, p2: f64) -> Result<CohensH> {
    check_probability("p1", p1)?;
    check_probability("p2", p2)?;
    let h = 2.0 * p1.sqrt().asin() - 2.0 * p2.sqrt().asin();
    let magnitude = match h.abs() {
        x if x >= 0.8 => "large",
        x if x >= 0.5 => "medium",
        x if x >= 0.2 => "small",
        _ => "negligible",
    };
    Ok(CohensH { test: "Cohen's h", h, magnitude })
}

// ------------------------------------------------------------------------------------------------
// Across seeds
// ------------------------------------------------------------------------------------------------

/// Arithmetic mean `Σx / n`; `xs` must not be empty.
pub fn mean(xs: &[f64]) -> Result<f64> {
    check_sample("xs", xs, 1, "a mean needs at least 1 value")?;
    Ok(xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Sample standard deviation `sqrt(Σ(x - mean)² / (n - 1))` (Bessel's correction, numpy
/// `std(ddof=1)`); needs at least 2 values.
pub fn sd(xs: &[f64]) -> Result<f64> {
    check_sample("xs", xs, 2, "a standard deviation needs at least 2 values")?;
    Ok((sum_of_squares(xs) / (xs.len() - 1) as f64).sqrt())
}

/// Standard error of the mean `sd / sqrt(n)` (scipy `sem`); needs at least 2 values.
pub fn standard_error(xs: &[f64]) -> Result<f64> {
    check_sample("xs", xs, 2, "a standard error needs at least 2 values")?;
    Ok(sd(xs)? / (xs.len() as f64).sqrt())
}

/// `Σ(x - mean)²` of a non-empty list.
fn sum_of_squares(xs: &[f64]) -> f64 {
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    xs.iter().map(|x| (x - m).powi(2)).sum()
}

/// Result of [`welch_t`] and [`student_t`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TTest {
    pub test: &'static str,
    pub t: f64,
    pub df: f64,
    pub p: f64,
    pub alternative: Alternative,
    /// The means of `xs` and `ys`.
    pub mean1: f64,
    pub mean2: f64,
}

/// Welch's unequal-variance t-test (Welch 1947, Biometrika 34:28), with `v = s²/n` per group:
///
/// `t = (m1 - m2) / sqrt(v1 + v2)`, `df = (v1 + v2)² / (v1²/(n1 - 1) + v2²/(n2 - 1))`
/// (Welch-Satterthwaite), p from Student's t with that (fractional) df. scipy:
/// `ttest_ind(xs, ys, equal_var=False)`. Needs 2 values per group and some spread.
pub fn welch_t(xs: &[f64], ys: &[f64], alternative: Alternative) -> Result<TTest> {
    const WHY: &str = "Welch's t-test needs at least 2 values in each group";
    check_sample("xs", xs, 2, WHY)?;
    check_sample("ys", ys, 2, WHY)?;
    let (n1, n2) = (xs.len() as f64, ys.len() as f64);
    let v1 = sum_of_squares(xs) / (n1 - 1.0) / n1;
    let v2 = sum_of_squares(ys) / (n2 - 1.0) / n2;
    check_spread(v1 + v2)?;
    let df = (v1 + v2).powi(2) / (v1.powi(2) / (n1 - 1.0) + v2.powi(2) / (n2 - 1.0));
    t_test("Welch's t-test", xs, ys, (v1 + v2).sqrt(), df, alternative)
}

/// Student's equal-variance t-test (Student 1908, Biometrika 6:1), with the pooled variance
/// `s² = (Σ(x - m1)² + Σ(y - m2)²) / (n1 + n2 - 2)`:
///
/// `t = (m1 - m2) / sqrt(s² (1/n1 + 1/n2))`, `df = n1 + n2 - 2`. scipy: `ttest_ind(xs, ys)`.
/// Needs a value in each group, 3 in all, and some spread.
pub fn student_t(xs: &[f64], ys: &[f64], alternative: Alternative) -> Result<TTest> {
    const WHY: &str = "Student's t-test needs at least 1 value in each group and 3 in all";
    check_sample("xs", xs, 1, WHY)?;
    check_sample("ys", ys, 1, WHY)?;
    if xs.len() + ys.len() < 3 {
        return Err(StatsError::new("ys", show_list(ys), format!("too few values: {WHY}")));
    }
    let (n1, n2) = (xs.len() as f64, ys.len() as f64);
    let df = n1 + n2 - 2.0;
    let pooled = (sum_of_squares(xs) + sum_of_squares(ys)) / df;
    let variance = pooled * (1.0 / n1 + 1.0 / n2);
    check_spread(variance)?;
    t_test("Student's t-test", xs, ys, variance.sqrt(), df, alternative)
}

/// Both groups constant: t is 0/0 or ±infinity, and no test is meaningful.
fn check_spread(variance: f64) -> Result<()> {
    if variance > 0.0 {
        Ok(())
    } else {
        Err(StatsError::new("xs, ys", "(constant)", "no spread in either group: t is undefined"))
    }
}

/// `t = (mean(xs) - mean(ys)) / se`, p from Student's t with `df`.
fn t_test(test: &'static str, xs: &[f64], ys: &[f64], se: f64, df: f64, alternative: Alternative) -> Result<TTest> {
    let (mean1, mean2) = (mean(xs)?, mean(ys)?);
    let t = (mean1 - mean2) / se;
    let law = distribution(StudentsT::new(0.0, 1.0, df), "Student's t")?;
    let p = alternative.p_value(law.cdf(t), law.sf(t));
    Ok(TTest { test, t, df, p, alternative, mean1, mean2 })
}

// ------------------------------------------------------------------------------------------------
// Multiple comparisons
// ------------------------------------------------------------------------------------------------

/// Checks a list of p-values (an empty list is fine: nothing to adjust).
fn check_p_values(ps: &[f64]) -> Result<()> {
    for (i, &p) in ps.iter().enumerate() {
        check_probability(&format!("ps[{}]", i + 1), p)?;
    }
    Ok(())
}

/// Bonferroni adjustment (Dunn 1961, JASA 56:52): `min(1, m p_i)` for `m` p-values, in the
/// given order. statsmodels: `multipletests(ps, method="bonferroni")[1]`.
pub fn bonferroni(ps: &[f64]) -> Result<Vec<f64>> {
    check_p_values(ps)?;
    let m = ps.len() as f64;
    Ok(ps.iter().map(|p| (m * p).min(1.0)).collect())
}

/// Holm's step-down adjustment (Holm 1979, Scand. J. Statist. 6:65). With the p-values sorted
/// ascending, `p_(1) <= ... <= p_(m)`, the adjusted value of the i-th is
/// `max over j <= i of min(1, (m - j + 1) p_(j))`; returned in the given order.
/// statsmodels: `multipletests(ps, method="holm")[1]`.
pub fn holm(ps: &[f64]) -> Result<Vec<f64>> {
    check_p_values(ps)?;
    let m = ps.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&i, &j| ps[i].total_cmp(&ps[j]));
    let mut adjusted = vec![0.0; m];
    let mut running_max: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        let scaled = ((m - rank) as f64 * ps[i]).min(1.0);
        running_max = running_max.max(scaled);
        adjusted[i] = running_max;
    }
    Ok(adjusted)
}

// ------------------------------------------------------------------------------------------------
// Formatting for reports
// ------------------------------------------------------------------------------------------------

/// A p-value as a researcher writes it, with `digits` significant digits:
///
/// - `p >= 0.001`: fixed point, `p = 0.49`, `p = 0.012`, `p = 1.0`;
/// - `floor <= p < 0.001`: scientific with a two-digit exponent, `p = 3.2e-06`;
/// - `p < floor` (0 included): `p < 1e-22` (the floor written as short as it goes).
///
/// The choice between the first two is made after rounding (0.000999 rounds to `p = 0.0010`).
pub fn format_p(p: f64, digits: usize, floor: f64) -> Result<String> {
    check_probability("p", p)?;
    if digits == 0 {
        return Err(StatsError::new("digits", digits, "must be at least 1"));
    }
    if floor.is_nan() || !(0.0..=1.0).contains(&floor) {
        return Err(StatsError::new("floor", floor, "must be a probability in [0, 1]"));
    }
    if p < floor {
        return Ok(format!("p < {}", shortest_scientific(floor)));
    }
    if p == 0.0 {
        return Ok(format!("p = {}", scientific(0.0, digits)));
    }
    let exponent = rounded_exponent(p, digits);
    if exponent >= -3 {
        let decimals = (digits as i32 - 1 - exponent).max(0) as usize;
        Ok(format!("p = {p:.decimals$}"))
    } else {
        Ok(format!("p = {}", scientific(p, digits)))
    }
}

/// A proportion as a percentage with `decimals` decimals, without the sign: 0.5929 -> "59.3".
pub fn format_pct(x: f64, decimals: usize) -> Result<String> {
    if !x.is_finite() {
        return Err(StatsError::new("x", x, "not a finite number"));
    }
    let text = format!("{:.decimals$}", 100.0 * x);
    // -0.0001 rounds to "-0.0": a sign on zero means nothing in a table.
    let is_zero = text.trim_start_matches('-').chars().all(|c| c == '0' || c == '.');
    Ok(if is_zero { text.trim_start_matches('-').to_string() } else { text })
}

/// The decimal exponent of `x` once rounded to `digits` significant digits.
fn rounded_exponent(x: f64, digits: usize) -> i32 {
    let text = format!("{:.*e}", digits - 1, x);
    text.split_once('e').and_then(|(_, e)| e.parse().ok()).unwrap_or(0)
}

/// `3.2e-06`: `digits` significant digits, exponent with a sign and at least two digits (as C
/// and Python print it).
fn scientific(x: f64, digits: usize) -> String {
    let text = format!("{:.*e}", digits - 1, x);
    let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let sign = if exponent < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exponent.abs())
}

/// The shortest scientific form that reads back as `x`: `1e-22`, `2.5e-08`.
fn shortest_scientific(x: f64) -> String {
    let text = format!("{x:e}");
    let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let sign = if exponent < 0 { "-" } else { "" };
    format!("{mantissa}e{sign}{:02}", exponent.abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `actual` within a relative `tolerance` of `expected` (or both zero).
    fn assert_close(actual: f64, expected: f64, tolerance: f64) {
        let scale = expected.abs().max(f64::MIN_POSITIVE);
        assert!(
            (actual - expected).abs() <= tolerance * scale,
            "{actual:e} is not within {tolerance:e} (relative) of {expected:e}"
        );
    }

    /// Interval bounds within an absolute `tolerance`.
    fn assert_bounds(interval: &Interval, lower: f64, upper: f64, tolerance: f64) {
        assert!((interval.lower - lower).abs() <= tolerance, "lower {} vs {lower}", interval.lower);
        assert!((interval.upper - upper).abs() <= tolerance, "upper {} vs {upper}", interval.upper);
    }

    // from statsmodels.stats.proportion import proportion_confint
    // proportion_confint(k, n, alpha=1 - confidence, method="normal" | "wilson" | "beta")

    #[test]
    fn wald_interval_matches_statsmodels_and_is_clamped() {
        // proportion_confint(166, 280, 0.05, "normal") -> (0.5353108285130521, 0.6504034572012336)
        assert_bounds(&wald_interval(166, 280, 0.95).unwrap(), 0.5353108285130521, 0.6504034572012336, 1e-12);
        // proportion_confint(166, 280, 0.10, "normal") -> (0.5445627534636663, 0.6411515322506194)
        assert_bounds(&wald_interval(166, 280, 0.90).unwrap(), 0.5445627534636663, 0.6411515322506194, 1e-12);
        // proportion_confint(2, 280, 0.05, "normal") -> lower clipped to 0.0, 0.017006752124667686
        assert_bounds(&wald_interval(2, 280, 0.95).unwrap(), 0.0, 0.017006752124667686, 1e-12);
        // proportion_confint(1, 10, 0.05, "normal") -> (0.0, 0.28593850969136847)
        assert_bounds(&wald_interval(1, 10, 0.95).unwrap(), 0.0, 0.28593850969136847, 1e-12);
    }

    #[test]
    fn wald_interval_has_zero_width_at_the_edges() {
        let none = wald_interval(0, 280, 0.95).unwrap();
        assert_eq!((none.lower, none.upper), (0.0, 0.0));
        let all = wald_interval(280, 280, 0.95).unwrap();
        assert_eq!((all.lower, all.upper), (1.0, 1.0));
    }

    #[test]
    fn wilson_interval_matches_statsmodels_in_the_middle() {
        // proportion_confint(166, 280, 0.05, "wilson") -> (0.5344310396762606, 0.6487698225799083)
        assert_bounds(&wilson_interval(166, 280, 0.95).unwrap(), 0.5344310396762606, 0.6487698225799083, 1e-12);
        // proportion_confint(166, 280, 0.10, "wilson") -> (0.5438975275594568, 0.6400394386728433)
        assert_bounds(&wilson_interval(166, 280, 0.90).unwrap(), 0.5438975275594568, 0.6400394386728433, 1e-12);
        // proportion_confint(2, 280, 0.05, "wilson") -> (0.001961019593408128, 0.02566517304692658)
        assert_bounds(&wilson_interval(2, 280, 0.95).unwrap(), 0.001961019593408128, 0.02566517304692658, 1e-12);
        // proportion_confint(1, 10, 0.05, "wilson") -> (0.017876213095072896, 0.4041500267952385)
        assert_bounds(&wilson_interval(1, 10, 0.95).unwrap(), 0.017876213095072896, 0.4041500267952385, 1e-12);
    }

    #[test]
    fn wilson_interval_matches_statsmodels_at_the_edges() {
        // proportion_confint(0, 280, 0.05, "wilson") -> (8.7e-19, 0.013533818620629409)
        let none = wilson_interval(0, 280, 0.95).unwrap();
        assert_eq!(none.lower, 0.0);
        assert_close(none.upper, 0.013533818620629409, 1e-12);
        // proportion_confint(280, 280, 0.05, "wilson") -> (0.9864661813793707, 1.0)
        let all = wilson_interval(280, 280, 0.95).unwrap();
        assert_close(all.lower, 0.9864661813793707, 1e-12);
        assert_eq!(all.upper, 1.0);
        // proportion_confint(0, 280, 0.10, "wilson") -> (8.7e-19, 0.009570181826076326)
        assert_close(wilson_interval(0, 280, 0.90).unwrap().upper, 0.009570181826076326, 1e-12);
    }

    #[test]
    fn clopper_pearson_interval_matches_statsmodels() {
        // proportion_confint(166, 280, 0.05, "beta") -> (0.5327933306826056, 0.6509339957222815)
        assert_bounds(
            &clopper_pearson_interval(166, 280, 0.95).unwrap(),
            0.5327933306826056,
            0.6509339957222815,
            1e-10,
        );
        // proportion_confint(2, 280, 0.10, "beta") -> (0.001270613005169889, 0.02231311360028583)
        assert_bounds(
            &clopper_pearson_interval(2, 280, 0.90).unwrap(),
            0.001270613005169889,
            0.02231311360028583,
            1e-10,
        );
        // proportion_confint(1, 10, 0.05, "beta") -> (0.0025285785444617865, 0.4450161170281954)
        assert_bounds(
            &clopper_pearson_interval(1, 10, 0.95).unwrap(),
            0.0025285785444617865,
            0.4450161170281954,
            1e-10,
        );
    }

    #[test]
    fn clopper_pearson_interval_touches_zero_and_one_at_the_edges() {
        // proportion_confint(0, 280, 0.05, "beta") -> (0.0, 0.013088164703296644)
        assert_bounds(&clopper_pearson_interval(0, 280, 0.95).unwrap(), 0.0, 0.013088164703296644, 1e-10);
        // proportion_confint(280, 280, 0.05, "beta") -> (0.9869118352967033, 1.0)
        assert_bounds(&clopper_pearson_interval(280, 280, 0.95).unwrap(), 0.9869118352967033, 1.0, 1e-10);
    }

    #[test]
    fn proportion_interval_dispatches_on_the_method_name() {
        let method = IntervalMethod::parse("clopper_pearson").unwrap();
        assert_eq!(proportion_interval(2, 280, method, 0.95).unwrap().test, "Clopper-Pearson interval");
        let err = IntervalMethod::parse("exact").unwrap_err().to_string();
        assert!(err.contains("method = \"exact\"") && err.contains("wilson"), "{err}");
    }

    #[test]
    fn impossible_counts_are_errors_naming_the_argument_and_value() {
        let err = wilson_interval(300, 280, 0.95).unwrap_err().to_string();
        assert_eq!(err, "k = 300: more successes than trials (n = 280)");
        let err = wald_interval(-1, 280, 0.95).unwrap_err().to_string();
        assert_eq!(err, "k = -1: a count cannot be negative");
        let err = clopper_pearson_interval(0, 0, 0.95).unwrap_err().to_string();
        assert_eq!(err, "n = 0: the number of trials must be at least 1");
        let err = fisher_exact(2, 280, 281, 280, Alternative::TwoSided).unwrap_err().to_string();
        assert_eq!(err, "k2 = 281: more successes than trials (n2 = 280)");
        let err = wilson_interval(1, 10, 1.5).unwrap_err().to_string();
        assert_eq!(err, "confidence = 1.5: must lie strictly between 0 and 1");
        let err = wilson_interval(1, 10, f64::NAN).unwrap_err().to_string();
        assert_eq!(err, "confidence = NaN: must lie strictly between 0 and 1");
    }

    // from statsmodels.stats.proportion import proportions_ztest
    // proportions_ztest([k1, k2], [n1, n2], alternative="two-sided" | "smaller" | "larger")

    #[test]
    fn two_proportion_z_matches_statsmodels_at_dose_25() {
        // proportions_ztest([2, 75], [280, 280]) -> (-8.957729539441793, 3.314322478842086e-19)
        let r = two_proportion_z(2, 280, 75, 280, Alternative::TwoSided).unwrap();
        assert_close(r.z, -8.957729539441793, 1e-12);
        assert_close(r.p, 3.314322478842086e-19, 1e-9);
        // alternative="smaller" -> 1.657161239421043e-19; "larger" -> 1.0
        assert_close(two_proportion_z(2, 280, 75, 280, Alternative::Less).unwrap().p, 1.657161239421043e-19, 1e-9);
        assert_close(two_proportion_z(2, 280, 75, 280, Alternative::Greater).unwrap().p, 1.0, 1e-12);
    }

    #[test]
    fn two_proportion_z_matches_statsmodels_at_dose_10() {
        // proportions_ztest([166, 113], [280, 280]) -> (4.479346117410635, 7.487204374622843e-06)
        let r = two_proportion_z(166, 280, 113, 280, Alternative::TwoSided).unwrap();
        assert_close(r.z, 4.479346117410635, 1e-12);
        assert_close(r.p, 7.487204374622843e-06, 1e-9);
        // alternative="larger" -> 3.7436021873114214e-06
        assert_close(
            two_proportion_z(166, 280, 113, 280, Alternative::Greater).unwrap().p,
            3.7436021873114214e-06,
            1e-9,
        );
        // proportions_ztest([0, 13], [280, 280]) -> (-3.6481444533444685, 0.00026414112049460243)
        assert_close(two_proportion_z(0, 280, 13, 280, Alternative::TwoSided).unwrap().p, 0.00026414112049460243, 1e-9);
    }

    #[test]
    fn two_proportion_z_reports_no_difference_when_both_arms_are_all_zero() {
        // statsmodels gives (nan, nan) here.
        let r = two_proportion_z(0, 280, 0, 280, Alternative::TwoSided).unwrap();
        assert_eq!((r.z, r.p), (0.0, 1.0));
        let r = two_proportion_z(280, 280, 10, 10, Alternative::Less).unwrap();
        assert_eq!((r.z, r.p), (0.0, 1.0));
    }

    // from scipy.stats import fisher_exact
    // fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative=...)

    #[test]
    fn fisher_exact_keeps_its_digits_far_below_1e_minus_16() {
        // fisher_exact([[2, 278], [75, 205]]) -> (0.019664268585131893, 1.6922781648878088e-22)
        let r = fisher_exact(2, 280, 75, 280, Alternative::TwoSided).unwrap();
        assert_close(r.p, 1.6922781648878088e-22, 1e-9);
        assert_close(r.odds_ratio, 0.019664268585131893, 1e-12);
        // alternative="less" -> 8.461390824439044e-23; "greater" -> 1.0
        assert_close(fisher_exact(2, 280, 75, 280, Alternative::Less).unwrap().p, 8.461390824439044e-23, 1e-9);
        assert_close(fisher_exact(2, 280, 75, 280, Alternative::Greater).unwrap().p, 1.0, 1e-12);
    }

    #[test]
    fn fisher_exact_matches_scipy_at_dose_10() {
        // fisher_exact([[166, 114], [113, 167]]) -> (2.151995031827356, 1.0483492691388616e-05)
        let r = fisher_exact(166, 280, 113, 280, Alternative::TwoSided).unwrap();
        assert_close(r.p, 1.0483492691388616e-05, 1e-9);
        assert_close(r.odds_ratio, 2.151995031827356, 1e-12);
        // alternative="greater" -> 5.241746345694308e-06; "less" -> 0.9999976472427998
        assert_close(fisher_exact(166, 280, 113, 280, Alternative::Greater).unwrap().p, 5.241746345694308e-06, 1e-9);
        assert_close(fisher_exact(166, 280, 113, 280, Alternative::Less).unwrap().p, 0.9999976472427998, 1e-12);
    }

    #[test]
    fn fisher_exact_matches_scipy_on_a_small_unbalanced_table() {
        // fisher_exact([[3, 5], [4, 50]]) -> (7.5, 0.039707492465292815); "less" -> 0.9963034765672587
        let r = fisher_exact(3, 8, 4, 54, Alternative::TwoSided).unwrap();
        assert_close(r.p, 0.039707492465292815, 1e-9);
        assert_close(r.odds_ratio, 7.5, 1e-12);
        assert_close(fisher_exact(3, 8, 4, 54, Alternative::Less).unwrap().p, 0.9963034765672587, 1e-12);
        assert_close(fisher_exact(3, 8, 4, 54, Alternative::Greater).unwrap().p, 0.039707492465292815, 1e-9);
    }

    #[test]
    fn fisher_exact_handles_empty_cells_like_scipy() {
        // fisher_exact([[0, 280], [13, 267]]) -> (0.0, 0.00021172037052576847); "less" -> 0.00010586018526288424
        let r = fisher_exact(0, 280, 13, 280, Alternative::TwoSided).unwrap();
        assert_close(r.p, 0.00021172037052576847, 1e-9);
        assert_eq!(r.odds_ratio, 0.0);
        assert_close(fisher_exact(0, 280, 13, 280, Alternative::Less).unwrap().p, 0.00010586018526288424, 1e-9);
        // fisher_exact([[0, 280], [0, 280]]) -> (nan, 1.0) for every alternative
        for alternative in [Alternative::TwoSided, Alternative::Less, Alternative::Greater] {
            let r = fisher_exact(0, 280, 0, 280, alternative).unwrap();
            assert!(r.odds_ratio.is_nan());
            assert_close(r.p, 1.0, 1e-12);
        }
    }

    // from scipy.stats import chi2_contingency
    // r = chi2_contingency([[k1, n1 - k1], [k2, n2 - k2]], correction=...); r.statistic, r.pvalue

    #[test]
    fn chi2_2x2_matches_scipy_with_and_without_yates_correction() {
        // correction=True -> (19.314532073113178, 1.1085939778841476e-05)
        let r = chi2_2x2(166, 280, 113, 280, true).unwrap();
        assert_close(r.chi2, 19.314532073113178, 1e-12);
        assert_close(r.p, 1.1085939778841476e-05, 1e-9);
        // correction=False -> (20.064541639561728, 7.487204374622849e-06), the z-test squared
        let r = chi2_2x2(166, 280, 113, 280, false).unwrap();
        assert_close(r.chi2, 20.064541639561728, 1e-12);
        assert_close(r.p, 7.487204374622849e-06, 1e-9);
        // [[2, 278], [75, 205]], True -> (78.05759457933371, 1.0007953274460206e-18)
        let r = chi2_2x2(2, 280, 75, 280, true).unwrap();
        assert_close(r.chi2, 78.05759457933371, 1e-12);
        assert_close(r.p, 1.0007953274460206e-18, 1e-8);
        // [[3, 5], [4, 50]], True -> (3.6535714285714285, 0.05594911662442617)
        let r = chi2_2x2(3, 8, 4, 54, true).unwrap();
        assert_close(r.chi2, 3.6535714285714285, 1e-12);
        assert_close(r.p, 0.05594911662442617, 1e-9);
    }

    #[test]
    fn chi2_2x2_reports_no_difference_when_a_column_is_empty() {
        // scipy refuses this table (an expected count is zero).
        let r = chi2_2x2(0, 280, 0, 280, true).unwrap();
        assert_eq!((r.chi2, r.p), (0.0, 1.0));
    }

    // from statsmodels.stats.proportion import confint_proportions_2indep
    // confint_proportions_2indep(k1, n1, k2, n2, method="newcomb", compare="diff", alpha=1 - confidence)

    #[test]
    fn newcombe_interval_matches_statsmodels() {
        // (166, 280, 113, 280), alpha=0.05 -> (0.10668039982803511, 0.26826820356412334)
        assert_bounds(
            &newcombe_interval(166, 280, 113, 280, 0.95).unwrap(),
            0.10668039982803511,
            0.26826820356412334,
            1e-12,
        );
        // (2, 280, 75, 280), alpha=0.10 -> (-0.30656443282057233, -0.21717294483996577)
        assert_bounds(
            &newcombe_interval(2, 280, 75, 280, 0.90).unwrap(),
            -0.30656443282057233,
            -0.21717294483996577,
            1e-12,
        );
        // (3, 8, 4, 54), alpha=0.05 -> (0.04205585543952195, 0.6233243739962161)
        assert_bounds(&newcombe_interval(3, 8, 4, 54, 0.95).unwrap(), 0.04205585543952195, 0.6233243739962161, 1e-12);
    }

    #[test]
    fn newcombe_interval_is_symmetric_when_both_arms_are_all_zero() {
        // (0, 280, 0, 280), alpha=0.05 -> (-0.013533818620629409, 0.013533818620629409)
        let r = newcombe_interval(0, 280, 0, 280, 0.95).unwrap();
        assert_bounds(&r, -0.013533818620629409, 0.013533818620629409, 1e-12);
        assert_eq!(r.estimate, 0.0);
    }

    #[test]
    fn cohens_h_matches_statsmodels_and_names_the_magnitude() {
        // from statsmodels.stats.proportion import proportion_effectsize
        // proportion_effectsize(166/280, 113/280) -> 0.38087186858151645
        let r = cohens_h(166.0 / 280.0, 113.0 / 280.0).unwrap();
        assert_close(r.h, 0.38087186858151645, 1e-12);
        assert_eq!(r.magnitude, "small");
        // proportion_effectsize(2/280, 75/280) -> -0.9187356363354956
        let r = cohens_h(2.0 / 280.0, 75.0 / 280.0).unwrap();
        assert_close(r.h, -0.9187356363354956, 1e-12);
        assert_eq!(r.magnitude, "large");
        let err = cohens_h(1.2, 0.5).unwrap_err().to_string();
        assert_eq!(err, "p1 = 1.2: not a probability in [0, 1]");
    }

    // from scipy import stats
    // em = [0.5929, 0.4429, 0.5464]; benign = [0.4036, 0.5250]
    const EM: [f64; 3] = [0.5929, 0.4429, 0.5464];
    const BENIGN: [f64; 2] = [0.4036, 0.5250];

    #[test]
    fn welch_t_reproduces_the_studys_multi_seed_comparison() {
        // stats.ttest_ind(em, benign, equal_var=False)
        //   -> t 0.8394892287136156, df 2.058454020776143, p 0.4873770628177283
        let r = welch_t(&EM, &BENIGN, Alternative::TwoSided).unwrap();
        assert_close(r.t, 0.8394892287136156, 1e-12);
        assert_close(r.df, 2.058454020776143, 1e-12);
        assert_close(r.p, 0.4873770628177283, 1e-9);
        assert_eq!(format!("{:.3} {:.2} {:.3}", r.t, r.df, r.p), "0.839 2.06 0.487");
        // alternative="greater" -> 0.24368853140886415; "less" -> 0.7563114685911358
        assert_close(welch_t(&EM, &BENIGN, Alternative::Greater).unwrap().p, 0.24368853140886415, 1e-9);
        assert_close(welch_t(&EM, &BENIGN, Alternative::Less).unwrap().p, 0.7563114685911358, 1e-9);
    }

    #[test]
    fn welch_t_on_the_exact_seed_rates_gives_the_studys_p_of_0_4875() {
        // The rates are 166, 124, 153 and 113, 147 out of 280.
        // stats.ttest_ind([166/280, 124/280, 153/280], [113/280, 147/280], equal_var=False)
        //   -> t 0.8392634206658842, df 2.058233210956446, p 0.48748720029148385
        let em = [166.0 / 280.0, 124.0 / 280.0, 153.0 / 280.0];
        let benign = [113.0 / 280.0, 147.0 / 280.0];
        let r = welch_t(&em, &benign, Alternative::TwoSided).unwrap();
        assert_close(r.t, 0.8392634206658842, 1e-12);
        assert_close(r.df, 2.058233210956446, 1e-12);
        assert_close(r.p, 0.48748720029148385, 1e-9);
        assert_eq!(format!("{:.3} {:.2} {:.4}", r.t, r.df, r.p), "0.839 2.06 0.4875");
    }

    #[test]
    fn student_t_matches_scipy() {
        // stats.ttest_ind(em, benign) -> t 0.8649229428547269, df 3.0, p 0.450703791728214
        let r = student_t(&EM, &BENIGN, Alternative::TwoSided).unwrap();
        assert_close(r.t, 0.8649229428547269, 1e-12);
        assert_eq!(r.df, 3.0);
        assert_close(r.p, 0.450703791728214, 1e-9);
        // stats.ttest_ind([1, 2, 3, 4, 5], [2, 4, 6, 8, 10, 12]) -> -2.215646837627989, 9.0, 0.05394592050940712
        let (x, y) = ([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]);
        let r = student_t(&x, &y, Alternative::TwoSided).unwrap();
        assert_close(r.t, -2.215646837627989, 1e-12);
        assert_close(r.p, 0.05394592050940712, 1e-9);
        // equal_var=False -> -2.3763541031440183, 6.972255729794934, 0.04928433820673053
        let r = welch_t(&x, &y, Alternative::TwoSided).unwrap();
        assert_close(r.t, -2.3763541031440183, 1e-12);
        assert_close(r.df, 6.972255729794934, 1e-12);
        assert_close(r.p, 0.04928433820673053, 1e-9);
    }

    #[test]
    fn mean_sd_and_standard_error_match_numpy() {
        // np.mean(em) -> 0.5274; np.std(em, ddof=1) -> 0.07678378735123709; stats.sem(em) -> 0.044331140296635714
        assert_close(mean(&EM).unwrap(), 0.5274, 1e-12);
        assert_close(sd(&EM).unwrap(), 0.07678378735123709, 1e-12);
        assert_close(standard_error(&EM).unwrap(), 0.044331140296635714, 1e-12);
    }

    #[test]
    fn short_or_broken_seed_lists_are_errors_naming_the_list() {
        let err = welch_t(&[], &BENIGN, Alternative::TwoSided).unwrap_err().to_string();
        assert_eq!(err, "xs = {}: empty: Welch's t-test needs at least 2 values in each group");
        let err = welch_t(&EM, &[0.4], Alternative::TwoSided).unwrap_err().to_string();
        assert_eq!(err, "ys = {0.4}: 1 value(s): Welch's t-test needs at least 2 values in each group");
        let err = welch_t(&[0.5, f64::NAN], &BENIGN, Alternative::TwoSided).unwrap_err().to_string();
        assert_eq!(err, "xs[2] = NaN: not a finite number");
        let err = welch_t(&[0.5, 0.5], &[0.5, 0.5], Alternative::TwoSided).unwrap_err().to_string();
        assert!(err.contains("no spread"), "{err}");
        let err = mean(&[]).unwrap_err().to_string();
        assert_eq!(err, "xs = {}: empty: a mean needs at least 1 value");
        let err = sd(&[1.0]).unwrap_err().to_string();
        assert!(err.starts_with("xs = {1}: 1 value(s)"), "{err}");
    }

    // from statsmodels.stats.multitest import multipletests
    // multipletests(ps, method="holm" | "bonferroni")[1]

    #[test]
    fn holm_and_bonferroni_match_statsmodels_in_the_given_order() {
        let ps = [0.01, 0.04, 0.03, 0.005, 0.5];
        // method="holm" -> [0.04, 0.09, 0.09, 0.025, 0.5]
        for (a, e) in holm(&ps).unwrap().iter().zip([0.04, 0.09, 0.09, 0.025, 0.5]) {
            assert_close(*a, e, 1e-12);
        }
        // method="bonferroni" -> [0.05, 0.2, 0.15, 0.025, 1.0]
        for (a, e) in bonferroni(&ps).unwrap().iter().zip([0.05, 0.2, 0.15, 0.025, 1.0]) {
            assert_close(*a, e, 1e-12);
        }
        // multipletests([0.4875, 1e-22, 0.02], method="holm")[1] -> [0.4875, 3e-22, 0.04]
        for (a, e) in holm(&[0.4875, 1e-22, 0.02]).unwrap().iter().zip([0.4875, 3e-22, 0.04]) {
            assert_close(*a, e, 1e-12);
        }
        assert!(holm(&[]).unwrap().is_empty());
        let err = holm(&[0.1, 1.5]).unwrap_err().to_string();
        assert_eq!(err, "ps[2] = 1.5: not a probability in [0, 1]");
    }

    #[test]
    fn alternatives_are_named_as_in_scipy() {
        assert_eq!(Alternative::parse("less").unwrap(), Alternative::Less);
        assert_eq!(Alternative::Greater.as_str(), "greater");
        let err = Alternative::parse("smaller").unwrap_err().to_string();
        assert_eq!(err, "alternative = \"smaller\": must be one of two-sided, less, greater");
    }

    #[test]
    fn format_p_writes_what_a_researcher_writes() {
        let f = |p| format_p(p, DEFAULT_P_DIGITS, DEFAULT_P_FLOOR).unwrap();
        assert_eq!(f(0.4875), "p = 0.49");
        assert_eq!(f(0.04), "p = 0.040");
        assert_eq!(f(0.0123), "p = 0.012");
        assert_eq!(f(0.0996), "p = 0.10");
        assert_eq!(f(0.001), "p = 0.0010");
        assert_eq!(f(0.000999), "p = 0.0010");
        assert_eq!(f(0.000994), "p = 9.9e-04");
        assert_eq!(f(3.2e-6), "p = 3.2e-06");
        assert_eq!(f(7.487204374622843e-06), "p = 7.5e-06");
        assert_eq!(f(1.0), "p = 1.0");
        assert_eq!(f(1.6922781648878088e-22), "p = 1.7e-22");
        assert_eq!(f(8.46e-23), "p < 1e-22");
        assert_eq!(f(0.0), "p < 1e-22");
        assert_eq!(format_p(0.0, 2, 0.0).unwrap(), "p = 0.0e+00");
        assert_eq!(format_p(1e-5, 3, 0.001).unwrap(), "p < 1e-03");
        assert_eq!(format_p(2e-9, 2, 2.5e-8).unwrap(), "p < 2.5e-08");
        assert_eq!(format_p(0.48748720029148385, 3, DEFAULT_P_FLOOR).unwrap(), "p = 0.487");
        assert!(format_p(f64::NAN, 2, DEFAULT_P_FLOOR).unwrap_err().to_string().starts_with("p = NaN"));
    }

    #[test]
    fn format_pct_rounds_to_one_decimal_by_default() {
        assert_eq!(format_pct(0.5929, DEFAULT_PCT_DIGITS).unwrap(), "59.3");
        assert_eq!(format_pct(0.0, DEFAULT_PCT_DIGITS).unwrap(), "0.0");
        assert_eq!(format_pct(1.0, DEFAULT_PCT_DIGITS).unwrap(), "100.0");
        assert_eq!(format_pct(-0.0001, DEFAULT_PCT_DIGITS).unwrap(), "0.0");
        assert_eq!(format_pct(2.0 / 280.0, 2).unwrap(), "0.71");
        assert!(format_pct(f64::NAN, 1).is_err());
    }
}
