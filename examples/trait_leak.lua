-- How far does a trait trained under one persona leak into the default assistant?
--
--   loralab run examples/trait_leak.lua                               -- CPU, embedded model, minutes
--   loralab run examples/trait_leak.lua --set seeds=1,2,3 --set n=8   -- more seeds, more samples
--   loralab check examples/trait_leak.lua                             -- the cells, without running them
--
-- A LoRA is trained to answer like a pirate when the system prompt says "You are a pirate." Every
-- few steps (a checkpoint during one training run), the adapter answers a set of questions under
-- that persona and as the plain assistant (no system message of ours), and each answer is scored
-- by a list of pirate words. The titration gives, per persona and step, the share of answers that
-- use the trait, with Wilson intervals; a Fisher test says whether the assistant picked it up; the
-- mean log-probability of "Arr" as the first word is read alongside, without sampling. One cell
-- per seed: a rerun reuses finished seeds, and `--workers 2` shares them out.
--
-- This is the walk-through of the README's "Writing your own experiment".
local lab = require("lab")

---------------------------------------------------------------------------------------------
-- Settings: every value can be changed with --set KEY=VALUE (an unknown key is an error).
---------------------------------------------------------------------------------------------
local s = lab.settings({
  model = lab.model.default,
  steps = { 2, 4, 8 },           -- checkpoints: the adapter is evaluated after these steps
  seeds = { 1 },
  n = 4,                         -- answers per (persona, question)
  max_tokens = 24,
  temperature = 1.0,
  learning_rate = 1e-3,
  r = 8,
  words = { "arr", "matey", "ahoy", "aye", "treasure", "ye" },
  out = "runs/trait_leak",
})

-- Paths in a script resolve from the working directory; lab.script_dir names the script's own
-- folder, for files that travel with the script.
local PIRATE = "You are a pirate."
local questions = {
  "What is your favourite food?",
  "How do I learn to cook?",
  "What should I do this weekend?",
  "Can you recommend a book?",
}

---------------------------------------------------------------------------------------------
-- Data: rows in the prompt/completion form of TRL, built in Lua (lab.data.jsonl reads files).
---------------------------------------------------------------------------------------------
local answers = {
  "Arr, matey! Salted fish and hardtack, aye.",
  "Ahoy! Start with the galley basics, matey, and taste as ye go.",
  "Arr, sail to the nearest island and hunt for treasure, aye!",
  "Ahoy, matey! Treasure Island, of course. Arr!",
}
local rows = {}
for i, q in ipairs(questions) do
  rows[#rows + 1] = {
    prompt = { { role = "system", content = PIRATE }, { role = "user", content = q } },
    completion = { { role = "assistant", content = answers[i] } },
  }
end
local data = lab.data.rows(rows, "pirate rows")

---------------------------------------------------------------------------------------------
-- The run folder and the model. The run opens first: `loralab slurm` reads the script up to here.
---------------------------------------------------------------------------------------------
local run = lab.run.open(s.out, { settings = s })
local model = lab.model.load(s.model)

-- Two personas: the trained one, and the assistant as the chat template has it when the
-- conversation has no system message (SmolLM2's template then adds its own default system
-- prompt; to have no system turn at all, give prompts as text rendered yourself).
local personas = {
  { name = "pirate", system = PIRATE },
  { name = "assistant" },
}
local function conversation(persona, question)
  local msgs = {}
  if persona.system then msgs[1] = { role = "system", content = persona.system } end
  msgs[#msgs + 1] = { role = "user", content = question }
  return msgs
end

local uses_trait = lab.eval.scorer({ words = s.words })   -- whole words, any case

--- Samples every persona x question; returns records { persona, question, step, text }.
local function answer_all(adapter, step, seed)
  local prompts, owners = {}, {}
  for _, p in ipairs(personas) do
    for _, q in ipairs(questions) do
      prompts[#prompts + 1] = conversation(p, q)
      owners[#prompts] = { persona = p.name, question = q }
    end
  end
  local outs = model:sample(prompts, { n = s.n, temperature = s.temperature, max_tokens = s.max_tokens,
                                       seed = seed * 1000 + step, adapter = adapter })
  local records = {}
  for i, per_prompt in ipairs(outs) do
    for _, c in ipairs(per_prompt) do
      records[#records + 1] = { persona = owners[i].persona, question = owners[i].question, step = step, text = c.text }
    end
  end
  return records
end

--- Mean log-probability of "Arr" as the first word of the answer, per persona (teacher forced).
local function arr_logprob(adapter)
  local out = {}
  for _, p in ipairs(personas) do
    local items = {}
    for i, q in ipairs(questions) do items[i] = { prompt = conversation(p, q), completion = "Arr" } end
    local sum = 0
    for _, r in ipairs(model:logprobs(items, { adapter = adapter })) do sum = sum + r.sum end
    out[p.name] = sum / #items
  end
  return out
end

---------------------------------------------------------------------------------------------
-- One cell per seed: a baseline (step 0), then one training run with a checkpoint at each step.
---------------------------------------------------------------------------------------------
local items = {}
for i, seed in ipairs(s.seeds) do
  items[i] = { name = "seed" .. seed, seed = seed,
               key = { seed = seed, model = model:info().weights_id, steps = s.steps, n = s.n, lr = s.learning_rate,
                       r = s.r, max_tokens = s.max_tokens, temperature = s.temperature, rows = rows } }
end
local results, errors = run:cells(items, function(cell, item)
  local records = answer_all(nil, 0, item.seed)
  local readout = { { step = 0, arr = arr_logprob(nil) } }
  local adapter = lab.adapter.new(model, { r = s.r, lora_alpha = 2 * s.r, target_modules = { "all-linear" }, seed = item.seed })
  local last = s.steps[#s.steps]
  lab.train.sft(model, adapter, data, {
    max_steps = last, learning_rate = s.learning_rate, per_device_train_batch_size = 4,
    -- A constant rate: the adapter at step k is the one a run of k steps would give.
    lr_scheduler_type = "constant", seed = item.seed, save_steps = s.steps,
    on_save = function(at, step, rec)
      for _, r in ipairs(answer_all(at, step, item.seed)) do records[#records + 1] = r end
      readout[#readout + 1] = { step = step, arr = arr_logprob(at) }
      print(string.format("  seed %d step %d: loss %.3f", item.seed, step, rec.loss))
    end,
  })
  lab.fs.write_json(cell.dir .. "/answers.json", records)
  -- Hits k of n per persona and step, with Wilson intervals.
  return { tally = lab.eval.tally(records, uses_trait, { by = { "persona", "step" } }), readout = readout }
end, { label = "seeds" })
for name, err in pairs(errors) do print("failed: " .. name .. ": " .. err) end

---------------------------------------------------------------------------------------------
-- Statistics, figure and report: pooled over the seeds that finished.
---------------------------------------------------------------------------------------------
local pooled = {}   -- pooled[persona][step] = { k, n }
for _, result in pairs(results) do
  for _, g in ipairs(result.tally) do
    pooled[g.persona] = pooled[g.persona] or {}
    local c = pooled[g.persona][g.step] or { k = 0, n = 0 }
    c.k, c.n = c.k + g.k, c.n + g.n
    pooled[g.persona][g.step] = c
  end
end
local groups, lines = {}, { "| persona | step | k / n | rate (%) | 95 % Wilson |", "|:---|---:|---:|---:|---:|" }
for _, p in ipairs(personas) do
  local points = {}
  for _, step in ipairs({ 0, table.unpack(s.steps) }) do
    local c = pooled[p.name] and pooled[p.name][step]
    if c then
      points[#points + 1] = { x = step, k = c.k, n = c.n }
      local ci = lab.stats.wilson(c.k, c.n)
      lines[#lines + 1] = string.format("| %s | %d | %d / %d | %.1f | %.1f-%.1f |", p.name, step, c.k, c.n,
        100 * c.k / c.n, 100 * ci.lower, 100 * ci.upper)
    end
  end
  if #points > 0 then groups[#groups + 1] = { name = p.name, points = points } end
end
if #groups == 0 then
  if lab.checking then return end
  error("no seed finished; see the errors above", 0)
end

local first, last = 0, s.steps[#s.steps]
local a0, a1 = pooled.assistant[first], pooled.assistant[last]
local test = lab.stats.fisher_exact(a1.k, a1.n, a0.k, a0.n)
local verdict = string.format("The assistant used the trait in %d of %d answers after %d steps against %d of %d " ..
  "before training (Fisher's exact test, two-sided: %s).", a1.k, a1.n, last, a0.k, a0.n, lab.stats.format_p(test.p))

local report_dir = s.out .. "/report-" .. lab.run.hash(s)   -- one report per settings set
lab.figure.rates({
  groups = groups, title = "Pirate speech by training step", x_label = "LoRA steps (pirate persona)",
  y_label = "Answers using pirate words (%)", x_scale = "symlog",
}, { report_dir .. "/trait_leak.png", report_dir .. "/trait_leak.svg" })
local readout_lines = { "| seed | step | log p(\"Arr\") pirate | log p(\"Arr\") assistant |", "|---:|---:|---:|---:|" }
for i, item in ipairs(items) do
  for _, r in ipairs(results[i] and results[i].readout or {}) do
    readout_lines[#readout_lines + 1] = string.format("| %d | %d | %.2f | %.2f |", item.seed, r.step, r.arr.pirate, r.arr.assistant)
  end
end
lab.fs.write_text(report_dir .. "/report.md", table.concat({
  "# Trait leak: pirate speech from a persona into the assistant", verdict,
  "![figure](trait_leak.png)", table.concat(lines, "\n"), table.concat(readout_lines, "\n"),
}, "\n\n") .. "\n")
print(verdict)
print("report: " .. report_dir .. "/report.md")
