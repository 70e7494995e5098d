---@meta
-- lab.figure: the study's figures, built on lab.plot. Tables are strict (unknown keys are errors).

---@class lab.figure
lab.figure = {}

---@class DosePoint
---@field dose number   Required. Second-stage steps (0 = the baseline, the merged base).
---@field k integer     Required. Completions carrying the marker.
---@field n integer     Required. Completions evaluated (>= 1).

---@class DoseSeeds
---@field dose number       Required. The dose these seeds were run at.
---@field rates number[]    Required. Per-seed marker rates as fractions (0.593, not 59.3).
---@field ids? integer[]    The seeds, one per rate (42, 137, 256); reports name columns by them. Default none.

---@class DoseCondition
---@field name string               Required. Legend entry ("EM", "benign").
---@field points DosePoint[]        Required. One per dose; drawn with confidence intervals.
---@field seeds? DoseSeeds[]        Per-seed rates, drawn as faint points. Default {}.
---@field color? string             Default: tab:blue, tab:orange, tab:green, ... by position.
---@field marker? "circle"|"square"|"triangle"|"diamond"|"none"  Default: circle, square, triangle, diamond, ... by position.

---@class DoseBand
---@field from number     Required. Start of the shaded steps range.
---@field to number       Required. End of it.
---@field label? string   Written at the top of the band ("EM cliff"). Default none.

---@class DoseResponseSpec
---@field conditions DoseCondition[]  Required, at least one.
---@field interval? "wald"|"wilson"|"clopper_pearson"  Error bars (lab.stats). Default "wald" (the study's).
---@field confidence? number          Default 0.95.
---@field band? DoseBand              Default none.
---@field title? string               Default none.
---@field x_label? string             Default "Second-stage SFT steps".
---@field y_label? string             Default "Marker rate (%)".
---@field caption? string|false       Default: "N = 280 per point · error bars: 95 % Wald intervals · faint points: individual seeds"; false for none.
---@field y_range? number[]           {low, high} in percent. Default: fitted to the data.
---@field linthresh? number           Linear half-width of the symlog steps axis. Default 1.
---@field baseline_label? string      Tick label of dose 0. Default "0".
---@field legend? string              As lab.plot.line's legend. Default "best".
---@field width? integer              Default 1600.
---@field height? integer             Default 1000.

---@class DoseSummaryOptions
---@field interval? "wald"|"wilson"|"clopper_pearson"  Default "wald".
---@field confidence? number  Default 0.95.

---@class DoseSummaryPoint
---@field dose number
---@field k integer
---@field n integer
---@field rate number   k / n.
---@field low number    Lower end of the interval (fraction).
---@field high number   Upper end of the interval (fraction).

---@class DoseSummaryCondition
---@field name string
---@field points DoseSummaryPoint[]  Sorted by dose.
---@field seeds DoseSeeds[]          Sorted by dose.
---@field color string
---@field marker string

---@class DoseSummary
---@field conditions DoseSummaryCondition[]
---@field interval string        "wald", "wilson" or "clopper_pearson".
---@field interval_name string   "Wald", "Wilson" or "Clopper-Pearson", for captions.
---@field confidence number

--- Draws marker rate (%) against steps on a symmetric-log axis with a tick at every dose, one line
--- per condition with confidence intervals, seeds as faint points, an optional shaded band.
--- Writes `path` (.png or .svg, or a list of both); returns the numbers drawn.
---@param spec DoseResponseSpec
---@param path string|string[]
---@return DoseSummary
function lab.figure.dose_response(spec, path) end

--- The numbers dose_response draws: conditions checked, points sorted, rates and intervals.
---@param conditions DoseCondition[]
---@param opts? DoseSummaryOptions
---@return DoseSummary
function lab.figure.summarize(conditions, opts) end

--- The doses of summarized conditions (`summarize(...).conditions`), sorted, each once: those of
--- their points, their seeds, or both (field nil).
---@param conditions table[]
---@param field? "points"|"seeds"
---@return number[]
function lab.figure.doses(conditions, field) end
