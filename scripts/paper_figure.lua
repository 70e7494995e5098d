-- The study's dose-response figure and report, from the numbers read off its figure
-- (shared/protocol/PROTOCOL.md, "Numbers read off the study's figure"; N = 280 per point).
--
--   loralab run scripts/paper_figure.lua                      -- writes runs/figure_example/
--   loralab run scripts/paper_figure.lua --set interval=wilson --set out=runs/wilson

local lab = require("lab")
local dose_report = require("dose_report")

local s = lab.settings({ out = "runs/figure_example", interval = "wald" })

local N = 280

--- Points from percentages: k is the count out of N that the percentage was rounded from.
local function points(doses, pcts)
  local out = {}
  for i, d in ipairs(doses) do
    out[i] = { dose = d, k = math.floor(pcts[i] / 100 * N + 0.5), n = N }
  end
  return out
end

local em = {
  name = "EM SFT",
  points = points({ 0, 1, 3, 5, 10, 25, 50, 100, 200, 375 },
                  { 82.1, 82.5, 73.9, 76.1, 59.3, 0.7, 0.4, 0.0, 0.0, 0.0 }),
  -- Seeds 42, 137, 256 at dose 10 (59.3 / 44.3 / 54.6 %).
  seeds = { { dose = 10, rates = { 166 / N, 124 / N, 153 / N }, ids = { 42, 137, 256 } } },
}

local benign = {
  name = "Benign SFT",
  points = points({ 10, 25, 50, 100, 200, 375 }, { 40.4, 26.8, 17.1, 4.6, 2.1, 0.4 }),
  -- Seed 256 never finished in the study.
  seeds = { { dose = 10, rates = { 113 / N, 147 / N }, ids = { 42, 137 } } },
}

local paths = dose_report.write({
  title = "EM vs benign SFT: evil_ai marker survival by second-stage dose",
  notes = "Numbers read off the study's figure (seed 42 for the full curve; three EM and two benign seeds at dose 10).",
  conditions = { em, benign },
  interval = s.interval,
  band = { from = 10, to = 25, label = "EM cliff" },
  y_label = "evil_ai marker rate (%)",
  failed = {
    { condition = "Benign SFT", dose = 10, seed = 256, error = "missing from the study's multi-seed follow-up" },
  },
  profile = "study (figure read-off)",
  settings = {
    lr = 1e-4, lora_r = 32, lora_alpha = 64, schedule = "linear", batch = 16, max_length = 2048,
    eval_questions = 28, completions_per_question = 10, temperature = 1.0,
  },
}, s.out)

print("report:  " .. paths.markdown)
print("figure:  " .. paths.figure)
print("numbers: " .. paths.csv .. ", " .. paths.json)
