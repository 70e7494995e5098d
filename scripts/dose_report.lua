-- The dose-response study's figure and report (../shared/protocol/PROTOCOL.md), built on the
-- generic lab.figure.rates: used by dose_response.lua and paper_figure.lua.
--
-- A study's data are conditions (EM, benign) of points {dose, k, n}, with per-seed rates at some
-- doses. `figure(spec, path)` draws marker rate against second-stage steps on a symmetric-log axis
-- (so dose 0, the baseline, sits next to doses 1..375) with a tick at every dose; `write(spec, dir)`
-- writes into `dir`:
--   report.md        headline table (rate and interval per condition and dose, gap, p with the
--                    test named), per-seed table with mean, sd and Welch's test, the figure,
--                    failed cells, the profile and settings that ran;
--   results.csv      one row per condition and dose (k, n, rate, interval);
--   seeds.csv        one row per condition, dose and seed;
--   comparisons.csv  one row per dose compared (gap, test, p);
--   results.json     all of the above in one document;
--   dose_response.png / .svg  the figure, unless `figure = false`.
-- Every file is written atomically through lab.fs, so a report is never half-written.

local lab = require("lab")
local options = lab.options

local M = {}

-- The study's figure -----------------------------------------------------------------------------

local FIGURE_KEYS = {
  "conditions", "interval", "confidence", "band", "title", "x_label", "y_label", "caption",
  "y_range", "linthresh", "baseline_label", "legend", "width", "height",
}
local CONDITION_KEYS = { "name", "points", "seeds", "color", "marker" }
local POINT_KEYS = { "dose", "k", "n" }
local SEED_KEYS = { "dose", "rates", "ids" }
local BAND_KEYS = { "from", "to", "label" }

--- The study's conditions as lab.figure groups: doses become x, seeds become runs.
local function as_groups(conditions)
  options.list(conditions, "conditions", "dose_report")
  local groups = {}
  for i, c in ipairs(conditions) do
    local ctx = string.format("dose_report: condition '%s'", tostring(type(c) == "table" and c.name or i))
    options.check(c, CONDITION_KEYS, ctx)
    local g = { name = c.name, color = c.color, marker = c.marker, points = {}, runs = {} }
    for j, p in ipairs(type(c.points) == "table" and c.points or {}) do
      options.check(p, POINT_KEYS, string.format("%s points[%d]", ctx, j))
      g.points[j] = { x = p.dose, k = p.k, n = p.n }
    end
    if c.points ~= nil and type(c.points) ~= "table" then g.points = c.points end
    for j, s in ipairs(c.seeds or {}) do
      options.check(s, SEED_KEYS, string.format("%s seeds[%d]", ctx, j))
      g.runs[j] = { x = s.dose, rates = s.rates, ids = s.ids }
    end
    groups[i] = g
  end
  return groups
end

--- The numbers the figure draws: each condition's points (dose, k, n, rate, low, high) sorted by
--- dose, and its seeds; interval "wald" unless given (the study's).
function M.summarize(conditions, opts)
  opts = opts or {}
  local summary = lab.figure.summarize(as_groups(conditions),
    { interval = opts.interval or "wald", confidence = opts.confidence }, "dose_report")
  local out = {}
  for i, g in ipairs(summary.groups) do
    local c = { name = g.name, color = g.color, marker = g.marker, points = {}, seeds = {} }
    for j, p in ipairs(g.points) do
      c.points[j] = { dose = p.x, k = p.k, n = p.n, rate = p.rate, low = p.low, high = p.high }
    end
    for j, r in ipairs(g.runs) do c.seeds[j] = { dose = r.x, rates = r.rates, ids = r.ids } end
    out[i] = c
  end
  return { conditions = out, interval = summary.interval, interval_name = summary.interval_name,
           confidence = summary.confidence }
end

--- The doses of summarized conditions, sorted, each once: of their points, seeds, or both.
function M.doses(conditions, field)
  if field ~= nil and field ~= "points" and field ~= "seeds" then
    error(string.format("dose_report.doses: field must be 'points', 'seeds' or nil (both), got %s", tostring(field)), 0)
  end
  local set, list = {}, {}
  for _, c in ipairs(conditions) do
    for _, f in ipairs(field and { field } or { "points", "seeds" }) do
      for _, e in ipairs(c[f]) do set[e.dose] = true end
    end
  end
  for d in pairs(set) do list[#list + 1] = d end
  table.sort(list)
  return list
end

local function dose_label(d, baseline_label)
  if d == 0 then return baseline_label end
  if d == math.floor(d) then return string.format("%d", d) end
  return tostring(d)
end

--- Draws the dose-response figure to `path` (.png or .svg, or a list of both) and returns the
--- numbers it drew (as `summarize`).
function M.figure(spec, path)
  spec = options.check(spec, FIGURE_KEYS, "dose_report.figure")
  local summary = M.summarize(spec.conditions, { interval = spec.interval, confidence = spec.confidence })
  local doses = M.doses(summary.conditions)
  local labels = {}
  for i, d in ipairs(doses) do labels[i] = dose_label(d, spec.baseline_label or "0") end
  local caption = spec.caption
  if caption == nil then
    caption = lab.figure.caption({ groups = as_groups(spec.conditions), interval_name = summary.interval_name,
                                   confidence = summary.confidence }):gsub("individual runs", "individual seeds")
  end
  local band = spec.band and options.check(spec.band, BAND_KEYS, "dose_report.figure: band")
  lab.figure.rates({
    groups = as_groups(spec.conditions),
    interval = summary.interval,
    confidence = summary.confidence,
    title = spec.title,
    caption = caption,
    x_label = spec.x_label or "Second-stage SFT steps",
    y_label = spec.y_label or "Marker rate (%)",
    x_scale = "symlog",
    x_linthresh = spec.linthresh or 1,
    x_ticks = doses,
    x_tick_labels = labels,
    y_range = spec.y_range,
    legend = spec.legend,
    width = spec.width,
    height = spec.height,
    bands = band and { { from = band.from, to = band.to, label = band.label } } or nil,
  }, path)
  return summary
end

-- The study's report ----------------------------------------------------------------------------

local REPORT_KEYS = {
  "title", "conditions", "compare", "interval", "confidence", "test", "band", "figure",
  "x_label", "y_label", "failed", "settings", "profile", "notes",
}
local FAILED_KEYS = { "condition", "dose", "seed", "error", "attempts" }

--- The two-proportion tests a report can name, by lab.stats function.
local TESTS = { z = "two_proportion_z", fisher = "fisher_exact" }

local function fail(fmt, ...)
  error(string.format(fmt, ...), 0)
end

-- Formatting ------------------------------------------------------------------------------------

--- A fraction as a percentage with one decimal: 0.5929 -> "59.3".
local function pct(x)
  return lab.stats.format_pct(x, { digits = 1 })
end

--- "59.3 [53.5, 65.0]"
local function rate_ci(p)
  return string.format("%s [%s, %s]", pct(p.rate), pct(p.low), pct(p.high))
end

--- "p = 0.49", "p < 1e-22".
local function p_text(p)
  return lab.stats.format_p(p)
end

local function dose_text(d)
  if d == math.floor(d) then return string.format("%d", d) end
  return tostring(d)
end

--- A table cell: pipes escaped so a name cannot break the table.
local function cell(s)
  return (tostring(s):gsub("|", "\\|"))
end

local function md_row(cells)
  local out = {}
  for i, c in ipairs(cells) do out[i] = cell(c) end
  return "| " .. table.concat(out, " | ") .. " |"
end

--- Header row plus alignment row; the first column left-aligned, numbers right-aligned.
local function md_header(cells)
  local align = { ":---" }
  for i = 2, #cells do align[i] = "---:" end
  return md_row(cells) .. "\n|" .. table.concat(align, "|") .. "|"
end

--- A settings value on one line: lists comma-separated, tables as k=v sorted by key.
local function value_text(v)
  if type(v) ~= "table" then return tostring(v) end
  if #v > 0 then
    local items = {}
    for i, x in ipairs(v) do items[i] = value_text(x) end
    return table.concat(items, ", ")
  end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  local items = {}
  for i, k in ipairs(keys) do items[i] = k .. "=" .. value_text(v[k]) end
  return "{" .. table.concat(items, ", ") .. "}"
end

-- Numbers ---------------------------------------------------------------------------------------

local function by_name(conditions)
  local t = {}
  for _, c in ipairs(conditions) do t[c.name] = c end
  return t
end

--- The entry of `list` (a condition's points or seeds) at `dose`, if any.
local function entry_at(list, dose)
  for _, e in ipairs(list) do
    if e.dose == dose then return e end
  end
  return nil
end

local function point_at(c, dose) return entry_at(c.points, dose) end
local function seeds_at(c, dose) return entry_at(c.seeds, dose) end

--- The two conditions compared: `compare = {a, b}`, else the first two.
local function compared(summary, compare)
  local names = by_name(summary.conditions)
  if compare == nil then
    if #summary.conditions < 2 then return nil end
    return summary.conditions[1], summary.conditions[2]
  end
  if type(compare) ~= "table" or #compare ~= 2 then
    fail("dose_report.write: compare must be two condition names, e.g. {'EM', 'benign'}")
  end
  for _, n in ipairs(compare) do
    if not names[n] then fail("dose_report.write: compare names '%s', which is not a condition", tostring(n)) end
  end
  return names[compare[1]], names[compare[2]]
end

--- Gap and p at every dose both conditions measured.
local function compare_points(a, b, test)
  local out = {}
  for _, dose in ipairs(M.doses({ a, b }, "points")) do
    local pa, pb = point_at(a, dose), point_at(b, dose)
    if pa and pb then
      local r = lab.stats[TESTS[test]](pa.k, pa.n, pb.k, pb.n)
      out[#out + 1] = {
        dose = dose, a = a.name, b = b.name, gap_pp = 100 * (pa.rate - pb.rate), test = r.test, p = r.p,
      }
    end
  end
  return out
end

--- Mean and sd of each seed set (sd needs two seeds).
local function describe_seeds(summary)
  for _, c in ipairs(summary.conditions) do
    for _, s in ipairs(c.seeds) do
      s.mean = lab.stats.mean(s.rates)
      if #s.rates >= 2 then s.sd = lab.stats.sd(s.rates) end
    end
  end
end

--- Welch's t-test on the per-seed rates at every dose both conditions have two or more seeds.
local function compare_seeds(a, b)
  local out = {}
  for _, dose in ipairs(M.doses({ a, b }, "seeds")) do
    local sa, sb = seeds_at(a, dose), seeds_at(b, dose)
    -- Welch's t is undefined when neither group varies (all seeds at 0 %, say): no row then.
    local ok, r = false, nil
    if sa and sb and #sa.rates >= 2 and #sb.rates >= 2 then
      ok, r = pcall(lab.stats.welch_t, sa.rates, sb.rates)
    end
    if ok then
      out[#out + 1] = {
        dose = dose, a = a.name, b = b.name, test = r.test, t = r.t, df = r.df, p = r.p,
        n_a = #sa.rates, n_b = #sb.rates,
      }
    end
  end
  return out
end

local function read_failed(failed)
  if failed == nil then return {} end
  if type(failed) ~= "table" then fail("dose_report.write: failed must be a list of cells") end
  for i, f in ipairs(failed) do
    options.check(f, FAILED_KEYS, string.format("dose_report.write: failed[%d]", i))
  end
  return failed
end

-- Markdown sections -----------------------------------------------------------------------------

local function headline_section(summary, a, b, comparisons)
  local conf = string.format("%g%% CI", summary.confidence * 100)
  local header = { "Steps" }
  for _, c in ipairs(summary.conditions) do header[#header + 1] = string.format("%s %% [%s]", c.name, conf) end
  local test_name = comparisons[1] and comparisons[1].test
  if a and test_name then
    header[#header + 1] = string.format("Gap (pp, %s - %s)", a.name, b.name)
    header[#header + 1] = "p, " .. test_name
  end
  local by_dose = {}
  for _, cmp in ipairs(comparisons) do by_dose[cmp.dose] = cmp end
  local lines = { "## Headline", "", md_header(header) }
  for _, dose in ipairs(M.doses(summary.conditions, "points")) do
    local row = { dose == 0 and "0 (baseline)" or dose_text(dose) }
    for _, c in ipairs(summary.conditions) do
      local p = point_at(c, dose)
      row[#row + 1] = p and rate_ci(p) or "-"
    end
    if a and test_name then
      local cmp = by_dose[dose]
      row[#row + 1] = cmp and string.format("%+.1f", cmp.gap_pp) or "-"
      row[#row + 1] = cmp and p_text(cmp.p) or "-"
    end
    lines[#lines + 1] = md_row(row)
  end
  return table.concat(lines, "\n")
end

--- Seed ids in order of first appearance, if every seed set at this dose names its seeds.
local function seed_columns(sets)
  local ids, seen = {}, {}
  for _, s in ipairs(sets) do
    if s.ids == nil then return nil end
    for _, id in ipairs(s.ids) do
      if not seen[id] then seen[id] = true; ids[#ids + 1] = id end
    end
  end
  return ids
end

local function seed_rows(rows, ids)
  local lines = {}
  for _, r in ipairs(rows) do
    local s = r.seeds
    local row = { r.name }
    if ids then
      local rate_of = {}
      for i, id in ipairs(s.ids) do rate_of[id] = s.rates[i] end
      for _, id in ipairs(ids) do row[#row + 1] = rate_of[id] and pct(rate_of[id]) or "(missing)" end
    else
      local rates = {}
      for i, x in ipairs(s.rates) do rates[i] = pct(x) end
      row[#row + 1] = table.concat(rates, ", ")
    end
    row[#row + 1] = pct(s.mean)
    row[#row + 1] = s.sd and pct(s.sd) or "-"
    row[#row + 1] = tostring(#s.rates)
    lines[#lines + 1] = md_row(row)
  end
  return lines
end

local function seeds_section(summary, seed_comparisons)
  local doses = M.doses(summary.conditions, "seeds")
  if #doses == 0 then return nil end
  local lines = { "## Across seeds" }
  for _, dose in ipairs(doses) do
    local rows = {}
    for _, c in ipairs(summary.conditions) do
      local s = seeds_at(c, dose)
      if s then rows[#rows + 1] = { name = c.name, seeds = s } end
    end
    local sets = {}
    for i, r in ipairs(rows) do sets[i] = r.seeds end
    local ids = seed_columns(sets)
    local header = { "Condition" }
    if ids then
      for _, id in ipairs(ids) do header[#header + 1] = "seed " .. tostring(id) .. " %" end
    else
      header[#header + 1] = "Rates %"
    end
    for _, h in ipairs({ "Mean %", "SD (pp)", "Seeds" }) do header[#header + 1] = h end
    lines[#lines + 1] = ""
    lines[#lines + 1] = string.format("### Dose %s", dose_text(dose))
    lines[#lines + 1] = ""
    lines[#lines + 1] = md_header(header)
    for _, l in ipairs(seed_rows(rows, ids)) do lines[#lines + 1] = l end
    for _, cmp in ipairs(seed_comparisons) do
      if cmp.dose == dose then
        lines[#lines + 1] = ""
        lines[#lines + 1] = string.format("%s vs %s (%s on the per-seed rates, %d vs %d seeds): t = %.2f, df = %.2f, %s.",
          cmp.a, cmp.b, cmp.test, cmp.n_a, cmp.n_b, cmp.t, cmp.df, p_text(cmp.p))
      end
    end
  end
  return table.concat(lines, "\n")
end

local function failed_section(failed)
  local lines = { "## Failed cells", "" }
  if #failed == 0 then
    lines[#lines + 1] = "None: every cell finished."
  end
  for _, f in ipairs(failed) do
    local where = { tostring(f.condition or "?") }
    if f.dose ~= nil then where[#where + 1] = "dose " .. dose_text(f.dose) end
    if f.seed ~= nil then where[#where + 1] = "seed " .. tostring(f.seed) end
    local tries = f.attempts and string.format(" (after %d attempts)", f.attempts) or ""
    lines[#lines + 1] = string.format("- %s: %s%s", table.concat(where, ", "), tostring(f.error or "failed"), tries)
  end
  return table.concat(lines, "\n")
end

local function settings_section(profile, settings)
  local lines = { "## What ran", "" }
  if profile then lines[#lines + 1] = string.format("Profile: `%s`", tostring(profile)); lines[#lines + 1] = "" end
  if settings == nil or next(settings) == nil then
    lines[#lines + 1] = "No settings were recorded."
    return table.concat(lines, "\n")
  end
  local keys = {}
  for k in pairs(settings) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  lines[#lines + 1] = "| Setting | Value |\n|:---|:---|"
  for _, k in ipairs(keys) do
    lines[#lines + 1] = string.format("| %s | `%s` |", cell(k), cell(value_text(settings[k])))
  end
  return table.concat(lines, "\n")
end

local function method_note(summary, comparisons)
  local n_lo, n_hi = math.huge, 0
  for _, c in ipairs(summary.conditions) do
    for _, p in ipairs(c.points) do n_lo, n_hi = math.min(n_lo, p.n), math.max(n_hi, p.n) end
  end
  local n = n_lo == n_hi and tostring(n_lo) or string.format("%d-%d", n_lo, n_hi)
  local parts = {
    string.format("N = %s completions per cell; intervals are %g%% %s intervals", n,
      summary.confidence * 100, summary.interval_name),
  }
  if comparisons[1] then parts[#parts + 1] = string.format("p-values: %s, two-sided", comparisons[1].test) end
  return table.concat(parts, "; ") .. "."
end

-- Files -----------------------------------------------------------------------------------------

local function join(dir, name)
  return (dir:gsub("/+$", "")) .. "/" .. name
end

local function write_csvs(dir, summary, comparisons)
  local rows, seed_rows_ = {}, {}
  for _, c in ipairs(summary.conditions) do
    for _, p in ipairs(c.points) do
      rows[#rows + 1] = { c.name, p.dose, p.k, p.n, p.rate, p.low, p.high, summary.interval }
    end
    for _, s in ipairs(c.seeds) do
      for i, r in ipairs(s.rates) do
        seed_rows_[#seed_rows_ + 1] = { condition = c.name, dose = s.dose, seed = s.ids and s.ids[i], rate = r }
      end
    end
  end
  lab.fs.write_csv(join(dir, "results.csv"), { "condition", "dose", "k", "n", "rate", "ci_low", "ci_high", "interval" }, rows)
  lab.fs.write_csv(join(dir, "seeds.csv"), { "condition", "dose", "seed", "rate" }, seed_rows_)
  lab.fs.write_csv(join(dir, "comparisons.csv"), { "dose", "a", "b", "gap_pp", "test", "p" }, comparisons)
end

--- Draws the figure into `dir` (the name given and its .svg twin); returns the PNG's name.
local function draw_figure(dir, spec, name)
  local paths = { join(dir, name) }
  local stem = name:match("^(.*)%.png$")
  if stem then paths[2] = join(dir, stem .. ".svg") end
  M.figure({
    conditions = spec.conditions, interval = spec.interval, confidence = spec.confidence,
    band = spec.band, x_label = spec.x_label, y_label = spec.y_label,
  }, paths)
  return name, stem and (stem .. ".svg")
end

--- Writes the dose-response report into `dir`; returns the paths written.
function M.write(spec, dir)
  spec = options.check(spec, REPORT_KEYS, "dose_report.write")
  if type(dir) ~= "string" or dir == "" then fail("dose_report.write: the second argument must be a folder path") end
  local test = spec.test or "z"
  if not TESTS[test] then fail("dose_report.write: unknown test '%s': use z or fisher", tostring(test)) end
  local summary = M.summarize(spec.conditions, { interval = spec.interval, confidence = spec.confidence })
  local failed = read_failed(spec.failed)
  local a, b = compared(summary, spec.compare)
  local comparisons = a and compare_points(a, b, test) or {}
  describe_seeds(summary)
  local seed_comparisons = a and compare_seeds(a, b) or {}
  lab.fs.mkdir(dir)

  local figure, svg
  if spec.figure ~= false then figure, svg = draw_figure(dir, spec, spec.figure or "dose_response.png") end

  local sections = { "# " .. (spec.title or "Dose-response report") }
  if spec.notes then sections[#sections + 1] = spec.notes end
  if figure then
    local line = string.format("![Dose-response figure](%s)", figure)
    if svg then line = line .. string.format("\n\n[SVG version](%s)", svg) end
    sections[#sections + 1] = line
  end
  sections[#sections + 1] = headline_section(summary, a, b, comparisons) .. "\n\n" .. method_note(summary, comparisons)
  sections[#sections + 1] = seeds_section(summary, seed_comparisons)
  sections[#sections + 1] = failed_section(failed)
  sections[#sections + 1] = settings_section(spec.profile, spec.settings)
  sections[#sections + 1] = "## Files\n\n`results.csv` (per condition and dose), `seeds.csv`, `comparisons.csv`, `results.json`."

  local paths = {
    markdown = join(dir, "report.md"), json = join(dir, "results.json"), csv = join(dir, "results.csv"),
    figure = figure and join(dir, figure) or nil,
  }
  lab.fs.write_text(paths.markdown, table.concat(sections, "\n\n") .. "\n")
  write_csvs(dir, summary, comparisons)
  lab.fs.write_json(paths.json, {
    title = spec.title, interval = summary.interval, confidence = summary.confidence,
    compare = a and { a.name, b.name } or {}, conditions = summary.conditions,
    comparisons = comparisons, seed_comparisons = seed_comparisons, failed = failed,
    profile = spec.profile, settings = spec.settings or {},
  })
  return paths
end

return M
