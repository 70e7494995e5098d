-- Sampling throughput of loralab and of transformers' generate, side by side on this machine.
--
--   loralab run examples/bench_sample.lua --set batch=32 --set max_tokens=64
--   loralab run examples/bench_sample.lua --set python=none        -- loralab only
--
-- Both generate exactly max_tokens tokens per row (stop tokens ignored) for the same `batch`
-- prompts at temperature 1, with the same model weights (the embedded SmolLM2 GGUF, f32).
local lab = require("lab")
local s = lab.settings({ batch = 32, prompt_words = 40, max_tokens = 64, python = ".venv/bin/python",
                         out = "runs/bench" })

local model = lab.model.load()
local words = { "river", "stone", "market", "lantern", "orchard", "signal", "harbor", "copper", "meadow", "engine" }
local prompts = {}
for i = 1, s.batch do
  local w = {}
  for j = 1, s.prompt_words do w[j] = words[(i * 7 + j * 3) % #words + 1] end
  prompts[i] = "Write a short story about " .. table.concat(w, " ") .. "."
end

-- warm-up, then the measured run
model:sample({ prompts[1] }, { max_tokens = 4, seed = 0 })
local t0 = lab.sys.time()
local _, st = model:sample(prompts, { n = 1, temperature = 1.0, max_tokens = s.max_tokens, seed = 1,
                                       ignore_eos = true, batch_size = s.batch })
local seconds = lab.sys.time() - t0
local ours = {
  generated_tokens_per_second = st.generated_tokens / st.decode_seconds,
  prefill_tokens_per_second = st.prompt_tokens / st.prefill_seconds,
  peak_rss_mb = lab.sys.peak_rss_mb(), seconds = seconds,
}
print(string.format("machine: %d threads", lab.sys.threads()))
print(string.format("loralab       batch %d: %6.1f generated tok/s, %7.1f prefill tok/s, peak %.0f MiB, %.1f s",
  s.batch, ours.generated_tokens_per_second, ours.prefill_tokens_per_second, ours.peak_rss_mb or 0, seconds))

if s.python ~= "none" then
  lab.fs.write_json(s.out .. "/prompts.json", prompts)
  local reference = require("reference")
  local cmd = string.format("%s scripts/bench/reference.py sample --gguf %s --prompts %s/prompts.json --max-tokens %d --threads %d",
    s.python, reference.default_gguf(), s.out, s.max_tokens, lab.sys.threads())
  local ref = reference.run(cmd, s.out .. "/reference_sample.json")
  print(string.format("transformers  batch %d: %6.1f generated tok/s, %7.1f prefill tok/s, peak %.0f MiB, %.1f s  (%s)",
    s.batch, ref.generated_tokens_per_second, ref.prefill_tokens_per_second, ref.peak_rss_mb, ref.seconds, ref.stack))
  print(string.format("ratio loralab / transformers: generated %.2fx, prefill %.2fx",
    ours.generated_tokens_per_second / ref.generated_tokens_per_second,
    ours.prefill_tokens_per_second / ref.prefill_tokens_per_second))
end
