-- Multi-seed replication at one dose: the study's named next step (dose 25, seeds 42/137/256).
--
--   loralab run scripts/replicate.lua --set dose=25 --set seeds=42,137,256
--
-- Reuses the Phase-1 base and every finished cell of scripts/dose_response.lua run with the
-- same profile and settings (same run folder), so only the missing (seed, condition) cells run.
local lab = require("lab")
local study = require("persona_marker")

local s, personas = study.settings({ dose = 25, seeds = { 42, 137, 256 } })
local base, run, data = study.setup(s)
local coupled, _, base_key = study.coupling(run, base, personas, s)

-- One cell per (seed, condition), as one group (shared by workers); the evaluation seed
-- follows the training seed.
local items = {}
for _, seed in ipairs(s.seeds) do
  for _, condition in ipairs({ "em", "benign" }) do
    items[#items + 1] = study.dose_item(s, {
      condition = condition, dose = s.dose, personas = s.coupling_eval_personas, base_key = base_key,
      data = data[condition].dataset, data_hash = data[condition].hash,
      train_seed = seed, eval_seed = s.eval_seed + seed - s.train_seed,
    })
  end
end
local results, errors = study.dose_cells(run, coupled, personas, s, items, "replicate")

local rates = { em = {}, benign = {} }   -- per-seed rates, in seed order
local cells = { em = {}, benign = {} }   -- cells[condition][seed] = result
print(string.format("\n%-8s %-7s %8s %8s", "seed", "cond.", "hits/N", "rate"))
for i, item in ipairs(items) do
  local seed, condition, r = item.c.train_seed, item.c.condition, results[i]
  if r then
    table.insert(rates[condition], r.source_rate)
    print(string.format("%-8d %-7s %4d/%-4d %7.1f%%", seed, condition, r.source_hits, r.source_total, 100 * r.source_rate))
    cells[condition][seed] = r
  else
    print(string.format("%-8d %-7s FAILED: %s", seed, condition, errors[i]))
  end
end

-- Per seed: EM vs benign within the seed (Fisher's exact test on the hit counts).
print(string.format("\nper seed, %s at dose %d:", s.source_persona, s.dose))
for _, seed in ipairs(s.seeds) do
  local em, benign = cells.em[seed], cells.benign[seed]
  if em and benign then
    local t = lab.stats.fisher_exact(em.source_hits, em.source_total, benign.source_hits, benign.source_total)
    print(string.format("  seed %-5d EM %5s%%  benign %5s%%  gap %+6.1f pp  %s (%s)", seed,
      lab.stats.format_pct(em.source_rate), lab.stats.format_pct(benign.source_rate),
      100 * (em.source_rate - benign.source_rate), lab.stats.format_p(t.p), t.test))
  end
end

-- Across seeds: Welch's t-test on the per-seed rates.
if #rates.em >= 2 and #rates.benign >= 2 then
  local summary = string.format("\nacross seeds: EM %.1f%% (sd %.1f) vs benign %.1f%% (sd %.1f)",
    100 * lab.stats.mean(rates.em), 100 * lab.stats.sd(rates.em), 100 * lab.stats.mean(rates.benign),
    100 * lab.stats.sd(rates.benign))
  -- Welch's t is undefined when neither group varies (e.g. every rate 0 %): say so.
  local ok, w = pcall(lab.stats.welch_t, rates.em, rates.benign)
  if ok then
    print(string.format("%s: t = %.2f, df = %.2f, %s (%s)", summary, w.t, w.df, lab.stats.format_p(w.p), w.test))
  else
    local why = tostring(w):match("^[^\n]*"):gsub("^runtime error: ", ""):gsub("^lab%.stats%.welch_t: ", "")
    print(summary .. ": no test (" .. why .. ")")
  end
end
