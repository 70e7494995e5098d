---@meta
-- lab.report: reports of finished runs, written atomically through lab.fs.

---@class lab.report
lab.report = {}

---@class FailedCell
---@field condition? string  The condition of the cell.
---@field dose? number       Its dose.
---@field seed? integer      Its seed.
---@field error? string      What went wrong. Default "failed".
---@field attempts? integer  How many times it was tried. Default not shown.

---@class DoseReportSpec
---@field conditions DoseCondition[]  Required, as lab.figure.dose_response.
---@field title? string               Default "Dose-response report".
---@field notes? string               Markdown placed under the title. Default none.
---@field compare? string[]           The two conditions compared (gap, p, Welch). Default: the first two.
---@field test? "z"|"fisher"          Test of two proportions per dose: pooled two-proportion z-test or Fisher's exact test (both two-sided). Default "z".
---@field interval? "wald"|"wilson"|"clopper_pearson"  Default "wald".
---@field confidence? number          Default 0.95.
---@field band? DoseBand              Passed to the figure. Default none.
---@field figure? string|false        File name of the figure in the folder (a .png also gets its .svg twin); false for none. Default "dose_response.png".
---@field x_label? string             Passed to the figure.
---@field y_label? string             Passed to the figure.
---@field failed? FailedCell[]        Cells that did not finish, listed in the report. Default {}.
---@field profile? string             Name of the profile that ran. Default none.
---@field settings? table<string, any>  The settings that ran, one table row each. Default none.

---@class DoseReportPaths
---@field markdown string  report.md
---@field json string      results.json
---@field csv string       results.csv (seeds.csv and comparisons.csv sit next to it)
---@field figure? string   The figure's PNG, unless figure = false.

--- Writes report.md, results.csv, seeds.csv, comparisons.csv, results.json and the figure into
--- `dir` (created if missing); returns their paths.
---@param spec DoseReportSpec
---@param dir string
---@return DoseReportPaths
function lab.report.dose_response(spec, dir) end
