--- lab.figure: charts of rates (k hits out of n) with confidence intervals, drawn with lab.plot.
---
--- `rates` draws one line per group of points {x, k, n}, each with its interval (lab.stats), on a
--- linear, log or symmetric-log x axis, with optional faint points for individual runs and shaded
--- bands. Its caption and labels come from the data and the options, never from an experiment's
--- vocabulary. `summarize` gives the numbers it draws, for tables and reports.

local lab = require("lab")
local options = lab.options

local M = {}

--- Colour and marker of the n-th group when it names none.
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
local RATES_KEYS = {
  "groups", "interval", "confidence", "title", "x_label", "y_label", "caption", "x_scale",
  "x_linthresh", "x_ticks", "x_tick_labels", "y_range", "bands", "legend", "width", "height",
}
local GROUP_KEYS = { "name", "points", "runs", "color", "marker", "line" }
local POINT_KEYS = { "x", "k", "n" }
local RUN_KEYS = { "x", "rates", "ids" }

local function fail(fmt, ...)
  error(string.format(fmt, ...), 0)
end

local function is_count(v)
  return math.type(v) == "integer" or (type(v) == "number" and v >= 0 and v == math.floor(v))
end

--- One measured point, checked, with its rate and interval (fractions).
local function read_point(p, i, ctx, method, confidence)
  local pctx = string.format("%s points[%d]", ctx, i)
  options.check(p, POINT_KEYS, pctx)
  if type(p.x) ~= "number" or p.x ~= p.x then fail("%s: x must be a number, got %s", pctx, tostring(p.x)) end
  if not is_count(p.n) or p.n < 1 then fail("%s (x = %s): n must be a whole number >= 1, got %s", pctx, p.x, tostring(p.n)) end
  if not is_count(p.k) or p.k > p.n then
    fail("%s (x = %s): k must be a whole number within 0..n (%d), got %s", pctx, p.x, p.n, tostring(p.k))
  end
  local k, n = math.tointeger(p.k), math.tointeger(p.n)
  local ci = lab.stats[method](k, n, { confidence = confidence })
  return { x = p.x, k = k, n = n, rate = k / n, low = ci.lower, high = ci.upper }
end

--- The rates of individual runs at one x, checked.
local function read_run(r, i, ctx)
  local rctx = string.format("%s runs[%d]", ctx, i)
  options.check(r, RUN_KEYS, rctx)
  if type(r.x) ~= "number" or r.x ~= r.x then fail("%s: x must be a number, got %s", rctx, tostring(r.x)) end
  options.list(r.rates, "rates", rctx)
  for j, v in ipairs(r.rates) do
    if type(v) ~= "number" or v ~= v or v < 0 or v > 1 then
      fail("%s (x = %s): rates[%d] = %s is not a fraction in 0..1 (write 0.593, not 59.3)", rctx, r.x, j, tostring(v))
    end
  end
  if r.ids ~= nil and #r.ids ~= #r.rates then
    fail("%s (x = %s): ids has %d entries but rates has %d", rctx, r.x, #r.ids, #r.rates)
  end
  return { x = r.x, rates = r.rates, ids = r.ids }
end

local function read_group(g, i, method, confidence, context)
  local ctx = string.format("%s: groups[%d]", context, i)
  options.check(g, GROUP_KEYS, ctx)
  if type(g.name) ~= "string" or g.name == "" then fail("%s needs a name", ctx) end
  ctx = string.format("%s: group '%s'", context, g.name)
  options.list(g.points, "points", ctx)
  local points, seen = {}, {}
  for j, p in ipairs(g.points) do
    local point = read_point(p, j, ctx, method, confidence)
    if seen[point.x] then fail("%s: x = %s appears twice in points", ctx, point.x) end
    seen[point.x] = true
    points[#points + 1] = point
  end
  table.sort(points, function(a, b) return a.x < b.x end)
  local runs = {}
  for j, r in ipairs(g.runs or {}) do runs[#runs + 1] = read_run(r, j, ctx) end
  table.sort(runs, function(a, b) return a.x < b.x end)
  local style = STYLES[(i - 1) % #STYLES + 1]
  return { name = g.name, points = points, runs = runs, color = g.color or style.color,
           marker = g.marker or style.marker, line = g.line }
end

--- The numbers `rates` draws: each group's points sorted by x, with `rate`, `low` and `high`
--- (fractions) from the chosen interval (default Wilson), and its runs.
function M.summarize(groups, opts, context)
  context = context or "lab.figure.summarize"
  opts = options.check(opts, SUMMARY_KEYS, context)
  local method = opts.interval or "wilson"
  if not INTERVAL_NAMES[method] then
    fail("%s: unknown interval '%s': use wilson, wald or clopper_pearson", context, tostring(method))
  end
  local confidence = opts.confidence or 0.95
  options.list(groups, "groups", context)
  local out, names = {}, {}
  for i, g in ipairs(groups) do
    local group = read_group(g, i, method, confidence, context)
    if names[group.name] then fail("%s: two groups are named '%s'", context, group.name) end
    names[group.name] = true
    out[#out + 1] = group
  end
  return { groups = out, interval = method, interval_name = INTERVAL_NAMES[method], confidence = confidence }
end

--- The x values of summarized groups, sorted, each once: those of their `points`, their
--- `runs`, or both (the default).
function M.xs(groups, field)
  if field ~= nil and field ~= "points" and field ~= "runs" then
    fail("lab.figure.xs: field must be 'points', 'runs' or nil (both), got %s", tostring(field))
  end
  local set, list = {}, {}
  for _, g in ipairs(groups) do
    for _, f in ipairs(field and { field } or { "points", "runs" }) do
      for _, e in ipairs(g[f]) do set[e.x] = true end
    end
  end
  for x in pairs(set) do list[#list + 1] = x end
  table.sort(list)
  return list
end

--- "n = 24 per point" or "n = 20-24 per point".
local function n_text(groups)
  local lo, hi = math.huge, 0
  for _, g in ipairs(groups) do
    for _, p in ipairs(g.points) do lo, hi = math.min(lo, p.n), math.max(hi, p.n) end
  end
  if lo == hi then return string.format("n = %d per point", lo) end
  return string.format("n = %d-%d per point", lo, hi)
end

--- The caption the data implies: sample sizes, the interval, the faint points if any.
function M.caption(summary)
  local parts = {
    n_text(summary.groups),
    string.format("error bars: %g%% %s intervals", summary.confidence * 100, summary.interval_name),
  }
  for _, g in ipairs(summary.groups) do
    if #g.runs > 0 then
      parts[#parts + 1] = "faint points: individual runs"
      break
    end
  end
  return table.concat(parts, " · ")
end

--- One lab.plot series per group, in percent.
local function series_of(g)
  local s = {
    name = g.name, x = {}, y = {}, yerr_low = {}, yerr_high = {},
    color = g.color, marker = g.marker, line = g.line, faint_x = {}, faint_y = {},
  }
  for _, p in ipairs(g.points) do
    s.x[#s.x + 1] = p.x
    s.y[#s.y + 1] = 100 * p.rate
    s.yerr_low[#s.yerr_low + 1] = 100 * p.low
    s.yerr_high[#s.yerr_high + 1] = 100 * p.high
  end
  for _, r in ipairs(g.runs) do
    for _, v in ipairs(r.rates) do
      s.faint_x[#s.faint_x + 1] = r.x
      s.faint_y[#s.faint_y + 1] = 100 * v
    end
  end
  return s
end

--- Ticks at the data's x values when there are few of them (a titration's doses), else lab.plot's.
local function default_ticks(summary)
  local xs = M.xs(summary.groups)
  if #xs <= 12 then return xs end
  return nil
end

--- Draws rate (%) against x for each group, with confidence intervals, to `path` (.png or .svg,
--- or a list of both); returns the numbers drawn (as `summarize`).
function M.rates(spec, path)
  spec = options.check(spec, RATES_KEYS, "lab.figure.rates")
  local summary = M.summarize(spec.groups, { interval = spec.interval, confidence = spec.confidence }, "lab.figure.rates")
  local series = {}
  for i, g in ipairs(summary.groups) do series[i] = series_of(g) end
  local caption = spec.caption
  if caption == nil then caption = M.caption(summary) end
  local ticks = spec.x_ticks
  if ticks == nil and spec.x_tick_labels == nil then ticks = default_ticks(summary) end
  lab.plot.line({
    title = spec.title,
    caption = caption or nil,
    x_label = spec.x_label or "",
    y_label = spec.y_label or "Rate (%)",
    x_scale = spec.x_scale or "linear",
    x_linthresh = spec.x_linthresh,
    x_ticks = ticks,
    x_tick_labels = spec.x_tick_labels,
    y_range = spec.y_range,
    legend = spec.legend or "best",
    width = spec.width,
    height = spec.height,
    series = series,
    bands = spec.bands,
  }, path)
  return summary
end

return M
