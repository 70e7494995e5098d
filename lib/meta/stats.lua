---@meta
-- lab.stats: intervals and tests for marker rates, t-tests across seeds, p-value adjustment,
-- report formatting. Counts are whole numbers (k out of n, n >= 1, 0 <= k <= n); options
-- tables are strict (unknown keys are errors). Every table result names its procedure in `test`.
-- Errors name the function, the argument and its value:
-- "lab.stats.wilson: k = 300: more successes than trials (n = 280)".

---@class lab.stats
lab.stats = {}

---@alias StatsAlternative "two-sided"|"less"|"greater"  As scipy: "less" means the first group is smaller.

---@class IntervalOptions
---@field confidence? number  Confidence level, strictly between 0 and 1. Default 0.95.

---@class ProportionCiOptions
---@field method? "wald"|"wilson"|"clopper_pearson"  Default "wilson".
---@field confidence? number  Default 0.95.

---@class AlternativeOptions
---@field alternative? StatsAlternative  Default "two-sided".

---@class Chi2Options
---@field correction? boolean  Yates' continuity correction. Default true (as scipy).

---@class FormatPOptions
---@field digits? integer  Significant digits. Default 2.
---@field floor? number    Below it, "p < floor" is written. Default 1e-22.

---@class FormatPctOptions
---@field digits? integer  Decimals. Default 1.

---@class StatsInterval
---@field test string        "Wald interval", "Wilson score interval", "Clopper-Pearson interval", "Newcombe hybrid score interval (method 10)".
---@field estimate number    k / n, or p1 - p2 for newcombe.
---@field lower number
---@field upper number
---@field confidence number

---@class ZTestResult
---@field test string        "two-proportion z-test (pooled)"
---@field z number
---@field p number
---@field alternative StatsAlternative
---@field p1 number          k1 / n1.
---@field p2 number          k2 / n2.
---@field pooled number      (k1 + k2) / (n1 + n2).

---@class FisherResult
---@field test string        "Fisher's exact test"
---@field odds_ratio number  k1 (n2 - k2) / ((n1 - k1) k2); inf when the denominator is 0, nan when a column is empty.
---@field p number
---@field alternative StatsAlternative

---@class Chi2Result
---@field test string        "chi-square test (2x2, Yates' correction)" or "chi-square test (2x2)"
---@field chi2 number
---@field df integer         1.
---@field p number
---@field correction boolean

---@class CohensHResult
---@field test string        "Cohen's h"
---@field h number
---@field magnitude "negligible"|"small"|"medium"|"large"  Cohen's thresholds 0.2, 0.5, 0.8 on |h|.

---@class TTestResult
---@field test string        "Welch's t-test" or "Student's t-test"
---@field t number
---@field df number          Fractional for Welch (Welch-Satterthwaite).
---@field p number
---@field alternative StatsAlternative
---@field mean1 number       Mean of xs.
---@field mean2 number       Mean of ys.

--- Wald interval p ± z·sqrt(p(1-p)/n), clamped to [0, 1] (zero width at k = 0 or n; the study's).
---@param k integer
---@param n integer
---@param opts? IntervalOptions
---@return StatsInterval
function lab.stats.wald(k, n, opts) end

--- Wilson score interval (Wilson 1927): well behaved at k = 0 and k = n.
---@param k integer
---@param n integer
---@param opts? IntervalOptions
---@return StatsInterval
function lab.stats.wilson(k, n, opts) end

--- Clopper-Pearson exact interval from beta quantiles (Clopper & Pearson 1934).
---@param k integer
---@param n integer
---@param opts? IntervalOptions
---@return StatsInterval
function lab.stats.clopper_pearson(k, n, opts) end

--- The interval of k out of n by the method named in opts (a script setting can choose it).
---@param k integer
---@param n integer
---@param opts? ProportionCiOptions
---@return StatsInterval
function lab.stats.proportion_ci(k, n, opts) end

--- Pooled two-proportion z-test of k1/n1 against k2/n2 (z = 0, p = 1 when both arms are all-0 or all-1).
---@param k1 integer
---@param n1 integer
---@param k2 integer
---@param n2 integer
---@param opts? AlternativeOptions
---@return ZTestResult
function lab.stats.two_proportion_z(k1, n1, k2, n2, opts) end

--- Fisher's exact test of the 2x2 table {{k1, n1-k1}, {k2, n2-k2}}; exact even for p far below 1e-16.
---@param k1 integer
---@param n1 integer
---@param k2 integer
---@param n2 integer
---@param opts? AlternativeOptions
---@return FisherResult
function lab.stats.fisher_exact(k1, n1, k2, n2, opts) end

--- Pearson's chi-square test of the 2x2 table, with or without Yates' correction (chi2 = 0, p = 1 for an empty column).
---@param k1 integer
---@param n1 integer
---@param k2 integer
---@param n2 integer
---@param opts? Chi2Options
---@return Chi2Result
function lab.stats.chi2_2x2(k1, n1, k2, n2, opts) end

--- Newcombe's hybrid score interval for p1 - p2 (Newcombe 1998, method 10).
---@param k1 integer
---@param n1 integer
---@param k2 integer
---@param n2 integer
---@param opts? IntervalOptions
---@return StatsInterval
function lab.stats.newcombe(k1, n1, k2, n2, opts) end

--- Cohen's h = 2 asin sqrt(p1) - 2 asin sqrt(p2) for two proportions (fractions, not percent).
---@param p1 number
---@param p2 number
---@return CohensHResult
function lab.stats.cohens_h(p1, p2) end

--- Welch's unequal-variance t-test of xs against ys (e.g. per-seed rates); 2+ values per group.
---@param xs number[]
---@param ys number[]
---@param opts? AlternativeOptions
---@return TTestResult
function lab.stats.welch_t(xs, ys, opts) end

--- Student's equal-variance t-test of xs against ys; 1+ value per group, 3+ in all.
---@param xs number[]
---@param ys number[]
---@param opts? AlternativeOptions
---@return TTestResult
function lab.stats.student_t(xs, ys, opts) end

--- Arithmetic mean of a non-empty list.
---@param xs number[]
---@return number
function lab.stats.mean(xs) end

--- Sample standard deviation (n - 1 in the denominator); 2+ values.
---@param xs number[]
---@return number
function lab.stats.sd(xs) end

--- Standard error of the mean, sd / sqrt(n); 2+ values.
---@param xs number[]
---@return number
function lab.stats.se(xs) end

--- Holm's step-down adjusted p-values (Holm 1979), a list in the order given.
---@param ps number[]
---@return number[]
function lab.stats.holm(ps) end

--- Bonferroni adjusted p-values min(1, m p), a list in the order given.
---@param ps number[]
---@return number[]
function lab.stats.bonferroni(ps) end

--- "p = 0.49" (p >= 0.001), "p = 3.2e-06" (floor <= p < 0.001), "p < 1e-22" (below the floor).
---@param p number
---@param opts? FormatPOptions
---@return string
function lab.stats.format_p(p, opts) end

--- A fraction as a percentage without the sign: 0.5929 -> "59.3".
---@param x number
---@param opts? FormatPctOptions
---@return string
function lab.stats.format_pct(x, opts) end
