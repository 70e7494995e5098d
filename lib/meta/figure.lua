---@meta
-- lab.figure: charts of rates (k hits out of n) with confidence intervals, built on lab.plot.
-- Captions and labels come from the data and the options. Tables are strict (unknown keys are
-- errors). The dose-response study's own figure and report are scripts/dose_report.lua.

---@class lab.figure
lab.figure = {}

---@class RatePoint
---@field x number      Required. Where the point sits (a dose, a step, a temperature...).
---@field k integer     Required. Hits.
---@field n integer     Required. Trials (>= 1).

---@class RateRuns
---@field x number        Required. The x these runs were measured at.
---@field rates number[]  Required. One rate per run, as fractions (0.593, not 59.3).
---@field ids? integer[]  The runs' names (seeds), one per rate. Default none.

---@class RateGroup
---@field name string         Required. Legend entry.
---@field points RatePoint[]  Required. One per x; drawn with confidence intervals.
---@field runs? RateRuns[]    Individual runs, drawn as faint points. Default {}.
---@field color? string       Default: tab:blue, tab:orange, tab:green, ... by position.
---@field marker? "circle"|"square"|"triangle"|"diamond"|"none"  Default: circle, square, triangle, diamond, ... by position.
---@field line? "solid"|"dashed"|"dotted"|"none"  Default "solid".

---@class RatesSpec
---@field groups RateGroup[]       Required, at least one.
---@field interval? "wilson"|"wald"|"clopper_pearson"  Error bars (lab.stats). Default "wilson".
---@field confidence? number       Default 0.95.
---@field title? string            Default none.
---@field x_label? string          Default "".
---@field y_label? string          Default "Rate (%)".
---@field caption? string|false    Default from the data: "n = 24 per point · error bars: 95% Wilson intervals" (and "faint points: individual runs" when there are runs); false for none.
---@field x_scale? "linear"|"log"|"symlog"  symlog shows 0 beside 1, 10, 100. Default "linear".
---@field x_linthresh? number      Linear half-width of a symlog axis. Default 1.
---@field x_ticks? number[]        Default: every x of the data when there are 12 or fewer, else round numbers.
---@field x_tick_labels? string[]  One per tick. Default: the values.
---@field y_range? number[]        {low, high} in percent. Default: fitted to the data.
---@field bands? PlotBand[]        Shaded x ranges, as lab.plot.line's. Default none.
---@field legend? string           As lab.plot.line's legend. Default "best".
---@field width? integer           Default 1600.
---@field height? integer          Default 1000.

---@class RateSummaryOptions
---@field interval? "wilson"|"wald"|"clopper_pearson"  Default "wilson".
---@field confidence? number  Default 0.95.

---@class RateSummaryPoint
---@field x number
---@field k integer
---@field n integer
---@field rate number   k / n.
---@field low number    Lower end of the interval (fraction).
---@field high number   Upper end of the interval (fraction).

---@class RateSummaryGroup
---@field name string
---@field points RateSummaryPoint[]  Sorted by x.
---@field runs RateRuns[]            Sorted by x.
---@field color string
---@field marker string

---@class RateSummary
---@field groups RateSummaryGroup[]
---@field interval string        "wilson", "wald" or "clopper_pearson".
---@field interval_name string   "Wilson", "Wald" or "Clopper-Pearson", for captions.
---@field confidence number

--- Draws rate (%) against x, one line per group with confidence intervals and runs as faint
--- points; writes `path` (.png or .svg, or a list of both) and returns the numbers drawn.
---@param spec RatesSpec
---@param path string|string[]
---@return RateSummary
function lab.figure.rates(spec, path) end

--- The numbers `rates` draws: groups checked, points sorted, rates and intervals.
---@param groups RateGroup[]
---@param opts? RateSummaryOptions
---@return RateSummary
function lab.figure.summarize(groups, opts) end

--- The x values of summarized groups, sorted, each once: of their points, their runs, or both (nil).
---@param groups RateSummaryGroup[]
---@param field? "points"|"runs"
---@return number[]
function lab.figure.xs(groups, field) end

--- The caption `rates` writes when given none, for a summary.
---@param summary RateSummary
---@return string
function lab.figure.caption(summary) end
