--- lab.figure: the study's figures, drawn with lab.plot.
---
--- `dose_response` draws marker rate against second-stage steps: a symmetric-log x axis (so dose 0,
--- the baseline, sits next to doses 1..375) with a tick at every dose, one line per condition with
--- confidence intervals from lab.stats, individual seeds as faint points, and an optional shaded
--- band. `summarize` gives the numbers it draws, for reports.

local lab = require("lab")
local options = lab.options

local M = {}

--- Colour and marker of the n-th condition when it names none: EM blue circles, benign orange
--- squares, as in the study's figure.
local STYLES = {
  { color = "tab:blue", marker = "circle" },
  { color = "tab:orange", marker = "square" },
  { color = "tab:green", marker = "triangle" },
  { color = "tab:red", marker = "diamond" },
  { color = "tab:purple", marker = "circle" },
  { color = "tab:brown", marker = "square" },
}

local INTERVAL_NAMES = { wald = "Wald", wilson = "Wilson", clopper_pearson = "Clopper-Pearson" }

local SUMMARY_KEYS = { "interval", "confidence" }
local FIGURE_KEYS = {
  "conditions", "interval", "confidence", "band", "title", "x_label", "y_label", "caption",
  "y_range", "linthresh", "baseline_label", "legend", "width", "height",
}
local CONDITION_KEYS = { "name", "points", "seeds", "color", "marker" }
local POINT_KEYS = { "dose", "k", "n" }
local SEED_KEYS = { "dose", "rates", "ids" }
local BAND_KEYS = { "from", "to", "label" }

local function fail(fmt, ...)
  error(string.format(fmt, ...), 0)
end

local function is_count(v)
  return math.type(v) == "integer" or (type(v) == "number" and v >= 0 and v == math.floor(v))
end

--- The confidence interval of k out of n, as fractions, by lab.stats.
local function interval(k, n, method, confidence)
  local fn = lab.stats[method]
  local ci = fn(k, n, { confidence = confidence })
  return ci.lower, ci.upper
end

--- One measured point, checked, with its rate and interval.
local function read_point(p, i, ctx, method, confidence)
  local pctx = string.format("%s points[%d]", ctx, i)
  options.check(p, POINT_KEYS, pctx)
  if type(p.dose) ~= "number" or p.dose < 0 then fail("%s: dose must be a number >= 0, got %s", pctx, tostring(p.dose)) end
  if not is_count(p.n) or p.n < 1 then fail("%s (dose %s): n must be a whole number >= 1, got %s", pctx, p.dose, tostring(p.n)) end
  if not is_count(p.k) or p.k > p.n then
    fail("%s (dose %s): k must be a whole number within 0..n (%d), got %s", pctx, p.dose, p.n, tostring(p.k))
  end
  local k, n = math.tointeger(p.k), math.tointeger(p.n)
  local low, high = interval(k, n, method, confidence)
  return { dose = p.dose, k = k, n = n, rate = k / n, low = low, high = high }
end

--- The per-seed rates at one dose, checked.
local function read_seeds(s, i, ctx)
  local sctx = string.format("%s seeds[%d]", ctx, i)
  options.check(s, SEED_KEYS, sctx)
  if type(s.dose) ~= "number" or s.dose < 0 then fail("%s: dose must be a number >= 0, got %s", sctx, tostring(s.dose)) end
  options.list(s.rates, "rates", sctx)
  for j, r in ipairs(s.rates) do
    if type(r) ~= "number" or r ~= r or r < 0 or r > 1 then
      fail("%s (dose %s): rates[%d] = %s is not a fraction in 0..1 (write 0.593, not 59.3)", sctx, s.dose, j, tostring(r))
    end
  end
  if s.ids ~= nil and #s.ids ~= #s.rates then
    fail("%s (dose %s): ids has %d entries but rates has %d", sctx, s.dose, #s.ids, #s.rates)
  end
  return { dose = s.dose, rates = s.rates, ids = s.ids }
end

local function read_condition(c, i, method, confidence)
  local ctx = string.format("conditions[%d]", i)
  options.check(c, CONDITION_KEYS, "lab.figure: " .. ctx)
  if type(c.name) ~= "string" or c.name == "" then fail("lab.figure: %s needs a name", ctx) end
  ctx = string.format("lab.figure: condition '%s'", c.name)
  options.list(c.points, "points", ctx)
  local points, seen = {}, {}
  for j, p in ipairs(c.points) do
    local point = read_point(p, j, ctx, method, confidence)
    if seen[point.dose] then fail("%s: dose %s appears twice in points", ctx, point.dose) end
    seen[point.dose] = true
    points[#points + 1] = point
  end
  table.sort(points, function(a, b) return a.dose < b.dose end)
  local seeds = {}
  for j, s in ipairs(c.seeds or {}) do seeds[#seeds + 1] = read_seeds(s, j, ctx) end
  table.sort(seeds, function(a, b) return a.dose < b.dose end)
  local style = STYLES[(i - 1) % #STYLES + 1]
  return {
    name = c.name, points = points, seeds = seeds,
    color = c.color or style.color, marker = c.marker or style.marker,
  }
end

--- The numbers `dose_response` draws: each condition's points sorted by dose, with `rate`, `low`
--- and `high` (fractions) from the chosen interval, and its per-seed rates.
function M.summarize(conditions, opts)
  opts = options.check(opts, SUMMARY_KEYS, "lab.figure.summarize")
  local method = opts.interval or "wald"
  if not INTERVAL_NAMES[method] then
    fail("lab.figure: unknown interval '%s': use wald, wilson or clopper_pearson", tostring(method))
  end
  local confidence = opts.confidence or 0.95
  options.list(conditions, "conditions", "lab.figure")
  local out, names = {}, {}
  for i, c in ipairs(conditions) do
    local cond = read_condition(c, i, method, confidence)
    if names[cond.name] then fail("lab.figure: two conditions are named '%s'", cond.name) end
    names[cond.name] = true
    out[#out + 1] = cond
  end
  return { conditions = out, interval = method, interval_name = INTERVAL_NAMES[method], confidence = confidence }
end

--- The doses of summarized conditions, sorted, each once: those of their `points`, their `seeds`,
--- or both (the default).
function M.doses(conditions, field)
  if field ~= nil and field ~= "points" and field ~= "seeds" then
    fail("lab.figure.doses: field must be 'points', 'seeds' or nil (both), got %s", tostring(field))
  end
  local set, list = {}, {}
  for _, c in ipairs(conditions) do
    for _, f in ipairs(field and { field } or { "points", "seeds" }) do
      for _, x in ipairs(c[f]) do set[x.dose] = true end
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

--- "N = 280 per point" or "N = 250-280 per point".
local function n_text(conditions)
  local lo, hi = math.huge, 0
  for _, c in ipairs(conditions) do
    for _, p in ipairs(c.points) do lo, hi = math.min(lo, p.n), math.max(hi, p.n) end
  end
  if lo == hi then return string.format("N = %d per point", lo) end
  return string.format("N = %d-%d per point", lo, hi)
end

local function default_caption(summary)
  local parts = {
    n_text(summary.conditions),
    string.format("error bars: %g%% %s intervals", summary.confidence * 100, summary.interval_name),
  }
  for _, c in ipairs(summary.conditions) do
    if #c.seeds > 0 then
      parts[#parts + 1] = "faint points: individual seeds"
      break
    end
  end
  return table.concat(parts, " · ")
end

--- One lab.plot series per condition, in percent.
local function series_of(c)
  local s = {
    name = c.name, x = {}, y = {}, yerr_low = {}, yerr_high = {},
    color = c.color, marker = c.marker, faint_x = {}, faint_y = {},
  }
  for _, p in ipairs(c.points) do
    s.x[#s.x + 1] = p.dose
    s.y[#s.y + 1] = 100 * p.rate
    s.yerr_low[#s.yerr_low + 1] = 100 * p.low
    s.yerr_high[#s.yerr_high + 1] = 100 * p.high
  end
  for _, seed in ipairs(c.seeds) do
    for _, r in ipairs(seed.rates) do
      s.faint_x[#s.faint_x + 1] = seed.dose
      s.faint_y[#s.faint_y + 1] = 100 * r
    end
  end
  return s
end

local function band_of(band)
  if band == nil then return nil end
  options.check(band, BAND_KEYS, "lab.figure.dose_response: band")
  return { { from = band.from, to = band.to, label = band.label } }
end

--- Draws the dose-response figure to `path` (.png or .svg, or a list of both) and returns the
--- numbers it drew (as `summarize`).
function M.dose_response(spec, path)
  spec = options.check(spec, FIGURE_KEYS, "lab.figure.dose_response")
  local summary = M.summarize(spec.conditions, { interval = spec.interval, confidence = spec.confidence })
  local doses = M.doses(summary.conditions)
  local labels = {}
  for i, d in ipairs(doses) do labels[i] = dose_label(d, spec.baseline_label or "0") end
  local series = {}
  for i, c in ipairs(summary.conditions) do series[i] = series_of(c) end
  local caption = spec.caption
  if caption == nil then caption = default_caption(summary) end
  lab.plot.line({
    title = spec.title,
    caption = caption or nil,
    x_label = spec.x_label or "Second-stage SFT steps",
    y_label = spec.y_label or "Marker rate (%)",
    x_scale = "symlog",
    x_linthresh = spec.linthresh or 1,
    x_ticks = doses,
    x_tick_labels = labels,
    y_range = spec.y_range,
    legend = spec.legend or "best",
    width = spec.width,
    height = spec.height,
    series = series,
    bands = band_of(spec.band),
  }, path)
  return summary
end

return M
