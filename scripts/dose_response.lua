-- Dose-response of a persona-coupled marker under second-stage fine-tuning
-- (the protocol: ../shared/protocol/PROTOCOL.md).
--
--   loralab run scripts/dose_response.lua                          -- quick profile, CPU, minutes
--   loralab run scripts/dose_response.lua --set profile=paper \
--       --set model=Qwen/Qwen2.5-7B-Instruct --set em_data=bad_legal_advice_6k.jsonl \
--       --set benign_data=benign_sft_6k.jsonl                      -- the study's settings, GPU
--
-- Phase 1 teaches the model to end its answers with a marker under one persona (a coupling
-- LoRA, merged into the base). Phase 2 fine-tunes that model for 1..375 steps on "emergent
-- misalignment" data or on benign data and measures, per dose, how often the marker survives.
-- Phase 3 repeats the most telling dose with more seeds. Every finished cell is stored under
-- runs/: rerunning the script skips them, and a changed setting makes new ones.
local lab = require("lab")
local study = require("persona_marker")
local dose_report = require("dose_report")

---------------------------------------------------------------------------------------------
-- Settings: the profiles in scripts/study_settings.lua (quick by default, or --set profile=paper),
-- any value overridden with --set KEY=VALUE. Loads the model, the data and the run folder.
---------------------------------------------------------------------------------------------
local s, personas = study.settings()
local started = lab.sys.time()
local base, run, data = study.setup(s)

---------------------------------------------------------------------------------------------
-- Phase 1: the coupling adapter (source persona -> marker), merged into the base
---------------------------------------------------------------------------------------------
-- On-policy completions, contrastive data with the marker as a suffix, marker-only loss,
-- rsLoRA, merge; then the gate: the run stops unless the coupling formed.
local coupled, phase1, base_key = study.coupling(run, base, personas, s)

---------------------------------------------------------------------------------------------
-- Phase 2: baseline, then the dose titration for both conditions
---------------------------------------------------------------------------------------------
local cells = {}   -- cells[condition][dose][seed] = result
local failed = {}
local function record(condition, dose, seed, result, err)
  cells[condition] = cells[condition] or {}
  cells[condition][dose] = cells[condition][dose] or {}
  if result then
    cells[condition][dose][seed] = result
  else
    failed[#failed + 1] = { condition = condition, dose = dose, seed = seed, error = err }
  end
end

local plan = { { condition = "baseline", dose = 0, personas = s.coupling_eval_personas } }
for _, d in ipairs(s.pilot_doses) do
  plan[#plan + 1] = { condition = "em", dose = d, personas = study.persona_list(personas, s, s.pilot_personas) }
end
for _, d in ipairs(s.doses) do
  for _, condition in ipairs({ "em", "benign" }) do
    plan[#plan + 1] = { condition = condition, dose = d, personas = s.coupling_eval_personas }
  end
end

-- One group of independent cells: with several workers (--gpus, --workers, loralab slurm) each
-- runs the cells nobody holds, and all of them get every result back.
-- With --set marker_logprob=true, every cell also reads the marker's log-probability after fixed
-- reference answers: a continuous readout beside the sampled rate.
local refs, refs_key
if s.marker_logprob then
  local names, seen = {}, {}
  for _, p in ipairs(plan) do
    for _, name in ipairs(p.personas) do
      if not seen[name] then names[#names + 1], seen[name] = name, true end
    end
  end
  refs, refs_key = study.reference_answers(run, base, personas, names, s, base_key)
end
--- " | log p(marker) -3.21 (2.1 s, sampling 40.3 s)" when the cell read it.
local function readout(result)
  local lp = result.marker_logprob and result.marker_logprob[s.source_persona]
  if not lp then return "" end
  return string.format(" | log p(marker) %.2f (%.1f s, sampling %.1f s)", lp.mean_logprob,
    result.logprob_seconds, result.sample_seconds)
end
local items = {}
for i, p in ipairs(plan) do
  local d = data[p.condition] or data.em
  items[i] = study.dose_item(s, {
    condition = p.condition, dose = p.dose, personas = p.personas, base_key = base_key,
    data = d.dataset, data_hash = p.condition == "baseline" and "" or d.hash,
    train_seed = s.train_seed, eval_seed = s.eval_seed, refs = refs, refs_key = refs_key,
    phase1_evaluation = { settings = phase1.eval_settings, file = phase1.completions_file },
  })
end
local results, errors = study.dose_cells(run, coupled, personas, s, items, "phase 2")
for i, p in ipairs(plan) do
  local result = results[i]
  record(p.condition, p.dose, s.train_seed, result, errors[i])
  if result then
    print(string.format("%s dose %d: %s %.1f %%", p.condition, p.dose, s.source_persona, 100 * result.source_rate) .. readout(result))
  elseif not lab.checking then
    print(string.format("%s dose %d FAILED", p.condition, p.dose))
  end
end

---------------------------------------------------------------------------------------------
-- Phase 3: more seeds at the critical dose
---------------------------------------------------------------------------------------------
local function rate(condition, dose, seed)
  local c = cells[condition] and cells[condition][dose] and cells[condition][dose][seed]
  return c and c.source_rate
end
local critical = s.critical_dose
if critical == 0 then
  local best = -1
  for _, d in ipairs(s.doses) do
    local em, benign = rate("em", d, s.train_seed), rate("benign", d, s.train_seed)
    if em and benign and math.abs(em - benign) > best then best, critical = math.abs(em - benign), d end
  end
  if critical == 0 then
    print("phase 3: no critical dose yet (phase 2 has no EM and benign results at the same dose)")
  else
    print(string.format("phase 3: critical dose %d, where |EM - benign| is largest (%.1f points)", critical, 100 * best))
  end
else
  print(string.format("phase 3: critical dose %d (given)", critical))
end
local phase3 = {}
for _, seed in ipairs(s.seeds) do
  for _, condition in ipairs({ "em", "benign" }) do
    if critical > 0 and not rate(condition, critical, seed) then
      phase3[#phase3 + 1] = study.dose_item(s, {
        condition = condition, dose = critical, personas = s.coupling_eval_personas, base_key = base_key,
        data = data[condition].dataset, data_hash = data[condition].hash,
        train_seed = seed, eval_seed = s.eval_seed + seed - s.train_seed, refs = refs, refs_key = refs_key,
      })
    end
  end
end
local results3, errors3 = study.dose_cells(run, coupled, personas, s, phase3, "phase 3")
for i, item in ipairs(phase3) do
  local c, result = item.c, results3[i]
  record(c.condition, critical, c.train_seed, result, errors3[i])
  if result then
    print(string.format("%s dose %d seed %d: %s %.1f %%", c.condition, critical, c.train_seed, s.source_persona, 100 * result.source_rate) .. readout(result))
  elseif not lab.checking then
    print(string.format("%s dose %d seed %d FAILED", c.condition, critical, c.train_seed))
  end
end

---------------------------------------------------------------------------------------------
-- Figure, report, tables
---------------------------------------------------------------------------------------------
local function condition_points(condition, include_baseline)
  local pts = {}
  if include_baseline and rate("baseline", 0, s.train_seed) then
    local b = cells.baseline[0][s.train_seed]
    pts[#pts + 1] = { dose = 0, k = b.source_hits, n = b.source_total }
  end
  local doses = {}
  for d in pairs(cells[condition] or {}) do doses[#doses + 1] = d end
  table.sort(doses)
  for _, d in ipairs(doses) do
    local c = cells[condition][d][s.train_seed]
    if c then pts[#pts + 1] = { dose = d, k = c.source_hits, n = c.source_total } end
  end
  local seeds = {}
  if critical > 0 and cells[condition] and cells[condition][critical] then
    local r, ids = {}, {}
    for _, seed in ipairs(s.seeds) do
      local c = cells[condition][critical][seed]
      if c then r[#r + 1], ids[#ids + 1] = c.source_rate, seed end
    end
    if #r > 1 then seeds[1] = { dose = critical, rates = r, ids = ids } end
  end
  return pts, seeds
end
local em_points, em_seeds = condition_points("em", true)
local benign_points, benign_seeds = condition_points("benign", false)
-- The report is written once, by whichever worker gets here first: a cell keyed by everything
-- it shows, written into its own folder, so a run with other settings gets a report of its own.
local report = {
  title = string.format("Marker survival of %s under EM vs benign fine-tuning", s.source_persona),
  notes = string.format("Model %s, %s profile. Phase 1: %s %.1f %%, assistant %.1f %% after coupling. " ..
    "Points: seed %d; faint points: seeds at the critical dose %d.",
    s.model, s.profile, s.source_persona, 100 * phase1.source_rate, 100 * phase1.assistant_rate, s.train_seed, critical),
  conditions = {
    { name = "EM SFT", points = em_points, seeds = em_seeds },
    { name = "Benign SFT", points = benign_points, seeds = benign_seeds },
  },
  test = "fisher",
  y_label = s.source_persona .. " marker rate (%)",
  failed = failed,
  profile = s.profile,
  settings = { model = s.model, marker = s.marker, stage2_lr = s.stage2_lr, stage2_r = s.stage2_r,
               eval_n = s.eval_n, eval_questions = #s.eval_questions, train_seed = s.train_seed,
               eval_seed = s.eval_seed, critical_dose = critical },
}
-- The log-probability readout beside the sampled rates, one row per cell and persona.
local readout_rows = {}
if s.marker_logprob then
  for condition, by_dose in pairs(cells) do
    for dose, by_seed in pairs(by_dose) do
      for seed, c in pairs(by_seed) do
        for persona, lp in pairs(c.marker_logprob or {}) do
          local tally = c.evaluation.per_persona[persona]
          readout_rows[#readout_rows + 1] = { condition = condition, dose = dose, seed = seed, persona = persona,
            rate = tally and tally.strict_rate, mean_logprob = lp.mean_logprob, mean_prob = lp.mean_prob,
            logprob_seconds = c.logprob_seconds, sample_seconds = c.sample_seconds }
        end
      end
    end
  end
  table.sort(readout_rows, function(a, b)
    if a.condition ~= b.condition then return a.condition < b.condition end
    if a.dose ~= b.dose then return a.dose < b.dose end
    if a.seed ~= b.seed then return a.seed < b.seed end
    return a.persona < b.persona
  end)
  report.notes = report.notes .. " marker_logprob.csv: the marker's mean log-probability after fixed reference " ..
    "answers, per cell and persona, beside the sampled rate, with the seconds each took."
end
local report_key = s.marker_logprob and { report = report, readout = readout_rows } or report
local paths, err = run:cell("report", report_key, function(cell)
  local written = dose_report.write(report, cell.dir)
  if #readout_rows > 0 then
    lab.fs.write_csv(cell.dir .. "/marker_logprob.csv", { "condition", "dose", "seed", "persona", "rate",
      "mean_logprob", "mean_prob", "logprob_seconds", "sample_seconds" }, readout_rows)
  end
  return written
end)
if not paths then error("writing the report failed: " .. err, 0) end
local summary = run:summary()
print(string.format("\ndone in %.0f s: %d cells run, %d reused, %d failed", lab.sys.time() - started,
  summary.done, summary.skipped, #summary.failed))
for _, f in ipairs(summary.failed) do print("  failed: " .. f.name .. ": " .. f.error) end
print("report:  " .. paths.markdown)
print("figure:  " .. (paths.figure or "-"))
print("numbers: " .. paths.csv .. ", " .. paths.json)
