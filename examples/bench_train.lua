-- LoRA training throughput of loralab and of PyTorch + PEFT, side by side on this machine.
--
--   loralab run examples/bench_train.lua --set batch=4 --set words=60
--   loralab run examples/bench_train.lua --set python=none        -- loralab only
--
-- Same model (the embedded SmolLM2 GGUF, f32), same rows (plain text, every token trained),
-- LoRA r 16 on all 7 projections, AdamW, grad-norm clipping, one warm-up step then `steps`.
local lab = require("lab")
local s = lab.settings({ batch = 4, words = 60, steps = 5, r = 16, python = ".venv/bin/python", out = "runs/bench" })

local model = lab.model.load()
local vocab = { "river", "stone", "market", "lantern", "orchard", "signal", "harbor", "copper", "meadow", "engine",
                "quiet", "golden", "north", "window", "garden", "paper", "silver", "morning", "bridge", "forest" }
local texts, rows = {}, {}
for i = 1, s.batch * (s.steps + 1) do
  local w = {}
  for j = 1, s.words do w[j] = vocab[(i * 7 + j * 13) % #vocab + 1] end
  texts[i] = table.concat(w, " ")
  rows[i] = { text = texts[i] }
end
local adapter = lab.adapter.new(model, { r = s.r, lora_alpha = 2 * s.r, target_modules = { "all-linear" }, seed = 0 })
local times, tokens = {}, {}
lab.train.sft(model, adapter, lab.data.rows(rows), {
  max_steps = s.steps + 1, learning_rate = 1e-4, weight_decay = 0.01, per_device_train_batch_size = s.batch,
  loss_mask = "all", shuffle = false, max_length = 4096,
  on_step = function(r) times[r.step], tokens[r.step] = r.seconds, r.seen_tokens end })
local secs, toks = 0, 0
for i = 2, s.steps + 1 do secs, toks = secs + times[i], toks + tokens[i] end
local ours = { tokens_per_second = toks / secs, seconds_per_step = secs / s.steps, peak_rss_mb = lab.sys.peak_rss_mb() }
print(string.format("machine: %d threads; batch %d x %d tokens", lab.sys.threads(), s.batch, toks // (s.steps * s.batch)))
print(string.format("loralab        %7.1f tok/s, %.2f s/step, peak %.0f MiB",
  ours.tokens_per_second, ours.seconds_per_step, ours.peak_rss_mb or 0))

if s.python ~= "none" then
  lab.fs.write_json(s.out .. "/rows.json", texts)
  local reference = require("reference")
  local cmd = string.format("%s scripts/bench/reference.py train --gguf %s --rows %s/rows.json --batch %d --steps %d --r %d --threads %d",
    s.python, reference.default_gguf(), s.out, s.batch, s.steps, s.r, lab.sys.threads())
  local ref = reference.run(cmd, s.out .. "/reference_train.json")
  print(string.format("torch + PEFT   %7.1f tok/s, %.2f s/step, peak %.0f MiB  (%s)",
    ref.tokens_per_second, ref.seconds_per_step, ref.peak_rss_mb, ref.stack))
  print(string.format("ratio loralab / torch + PEFT: %.2fx", ours.tokens_per_second / ref.tokens_per_second))
end
