-- Intervals and tests per dose for the study's counts (shared/protocol/PROTOCOL.md, "Numbers
-- read off the study's figure": evil_ai strict marker rate, N = 280 completions per point).
--
--   loralab run examples/stats.lua
--   loralab run examples/stats.lua --set confidence=0.99 --set interval=clopper_pearson

local lab = require("lab")

local s = lab.settings({ confidence = 0.95, interval = "wilson" })

local N = 280
local DOSES = { 0, 1, 3, 5, 10, 25, 50, 100, 200, 375 }
local EM_PCT = { 82.1, 82.5, 73.9, 76.1, 59.3, 0.7, 0.4, 0.0, 0.0, 0.0 }
local BENIGN_PCT = { [10] = 40.4, [25] = 26.8, [50] = 17.1, [100] = 4.6, [200] = 2.1, [375] = 0.4 }

-- Per-seed rates at dose 10 (seeds 42, 137, 256 for EM; 42, 137 for benign).
local EM_SEEDS = { 166 / N, 124 / N, 153 / N }
local BENIGN_SEEDS = { 113 / N, 147 / N }

--- The count out of N that a percentage of the figure was rounded from.
local function count(pct)
  return math.floor(pct / 100 * N + 0.5)
end

local pct = lab.stats.format_pct

--- "59.3 [53.4, 64.9]"
local function rate_with_ci(k)
  local ci = lab.stats.proportion_ci(k, N, { method = s.interval, confidence = s.confidence })
  return string.format("%s [%s, %s]", pct(ci.estimate), pct(ci.lower), pct(ci.upper))
end

print(string.format("evil_ai marker rate (%%), N = %d per point, %g %% %s intervals", N, 100 * s.confidence, s.interval))
print(string.format("%5s  %-20s %-20s %-22s %-13s %-13s %-13s %s",
  "dose", "EM", "benign", "EM - benign (Newcombe)", "z-test", "Fisher", "Fisher, Holm", "Cohen's h"))

-- First pass: every test per dose; Holm needs all the Fisher p-values at once.
local rows, fisher_ps = {}, {}
for i, dose in ipairs(DOSES) do
  local row = { dose = dose, em = count(EM_PCT[i]) }
  if BENIGN_PCT[dose] then
    row.benign = count(BENIGN_PCT[dose])
    row.z = lab.stats.two_proportion_z(row.em, N, row.benign, N)
    row.fisher = lab.stats.fisher_exact(row.em, N, row.benign, N)
    row.diff = lab.stats.newcombe(row.em, N, row.benign, N, { confidence = s.confidence })
    row.h = lab.stats.cohens_h(row.em / N, row.benign / N)
    fisher_ps[#fisher_ps + 1] = row.fisher.p
    row.fisher_index = #fisher_ps
  end
  rows[#rows + 1] = row
end
local holm = lab.stats.holm(fisher_ps)

for _, row in ipairs(rows) do
  local line = string.format("%5d  %-20s", row.dose, rate_with_ci(row.em))
  if row.benign then
    local diff = string.format("%s [%s, %s]", pct(row.diff.estimate), pct(row.diff.lower), pct(row.diff.upper))
    line = line .. string.format(" %-20s %-22s %-13s %-13s %-13s %+.2f (%s)",
      rate_with_ci(row.benign), diff, lab.stats.format_p(row.z.p), lab.stats.format_p(row.fisher.p),
      lab.stats.format_p(holm[row.fisher_index]), row.h.h, row.h.magnitude)
  end
  print((line:gsub("%s+$", "")))
end

print()
print("Across seeds at dose 10 (per-seed rates):")
local function seeds_text(rates)
  local out = {}
  for i, r in ipairs(rates) do out[i] = pct(r) end
  return table.concat(out, " / ")
end
local w = lab.stats.welch_t(EM_SEEDS, BENIGN_SEEDS)
print(string.format("  EM %s (mean %s, sd %s)  vs  benign %s (mean %s, sd %s)",
  seeds_text(EM_SEEDS), pct(lab.stats.mean(EM_SEEDS)), pct(lab.stats.sd(EM_SEEDS)),
  seeds_text(BENIGN_SEEDS), pct(lab.stats.mean(BENIGN_SEEDS)), pct(lab.stats.sd(BENIGN_SEEDS))))
print(string.format("  %s: t = %.3f, df = %.2f, %s", w.test, w.t, w.df, lab.stats.format_p(w.p)))
