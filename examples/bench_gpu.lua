-- LoRA training and sampling throughput on a GPU, loralab and transformers + PEFT side by side,
-- with random weights of a Qwen2.5 shape (scripts/bench/configs/).
--
--   loralab run examples/bench_gpu.lua --set config=scripts/bench/configs/qwen2.5-0.5b.json
--   loralab run examples/bench_gpu.lua --set seq=1024 --set python=none     -- loralab alone
--   loralab run examples/bench_gpu.lua --set reference_only=true           -- the reference alone
--   loralab run examples/bench_gpu.lua --set seq=2048 --set gradient_checkpointing=true
--   loralab run examples/bench_gpu.lua --set seq=128 --set tokens_per_pass=2048   -- a step's 16
--                                     short rows in one pass, as rows of varied length up to 512 would
--
--   loralab run examples/bench_gpu.lua --set ends=300 [--set continuous=false]  -- completions of
--                                     varied lengths, joining the batch as slots free
--
-- The reference samples `ref_prompts` of the prompts (transformers' generate keeps every row
-- of a batch to the end; the study's 336 prompts x 10 x 512 tokens would take it many minutes):
-- the ratio compares throughputs, each stack at its own batch.
local lab = require("lab")
local s = lab.settings({
  config = "scripts/bench/configs/qwen2.5-0.5b.json", dtype = "bf16", device = "cuda",
  seq = 256, batch = 4, grad_accum = 4, steps = 3, r = 32, lora_dropout = 0.0, gradient_checkpointing = false,
  tokens_per_pass = 0,
  prompts = 32, prompt_len = 64, n = 10, max_tokens = 128, sample_batch = 320, ref_prompts = 0, top_p = 1.0,
  ends = 0, group_size = 0, continuous = true, merged_copy = false,
  python = "python3", skip = "", reference_only = false, out = "runs/bench_gpu",
})

local model = lab.model.random(s.config, { dtype = s.dtype, device = s.device })
print(model)
-- `--set merged_copy=true`: a second copy of the weights held on the GPU, as a study cell holds
-- its merged model beside the base, so that sampling gets the memory it gets there.
local held = s.merged_copy and lab.model.random(s.config, { dtype = s.dtype, device = s.device }) or nil
local vocab = model:info().config.vocab_size
local result = { config = s.config, settings = s }

-- Training: (steps + 1) optimizer steps of batch x grad_accum rows of `seq` random tokens; the
-- first step (warm-up, kernel compilation) is not counted.
if not s.skip:find("train") and not s.reference_only then
  local rows, state = {}, 12345
  local function rand_token()
    state = (state * 1103515245 + 12345) % 2147483648
    return state % vocab
  end
  for i = 1, (s.steps + 1) * s.batch * s.grad_accum do
    local ids = {}
    for j = 1, s.seq do ids[j] = rand_token() end
    rows[i] = { input_ids = ids }
  end
  local adapter = lab.adapter.new(model, { r = s.r, lora_alpha = 2 * s.r, lora_dropout = s.lora_dropout,
                                            target_modules = { "all-linear" }, seed = 0 })
  local times = {}
  lab.train.sft(model, adapter, lab.data.rows(rows), {
    max_steps = s.steps + 1, learning_rate = 1e-4, per_device_train_batch_size = s.batch,
    gradient_accumulation_steps = s.grad_accum, max_length = s.seq, shuffle = false,
    gradient_checkpointing = s.gradient_checkpointing, tokens_per_pass = s.tokens_per_pass,
    on_step = function(r) times[r.step] = r.seconds end })
  local secs = 0
  for i = 2, s.steps + 1 do secs = secs + times[i] end
  result.train = { tokens_per_second = s.steps * s.batch * s.grad_accum * s.seq / secs, seconds_per_step = secs / s.steps,
                   gradient_checkpointing = s.gradient_checkpointing }
  print(string.format("loralab train  %d x %d x %d tokens%s%s: %8.0f tok/s, %.2f s/step",
    s.batch, s.grad_accum, s.seq, s.gradient_checkpointing and " (gradient checkpointing)" or "",
    s.tokens_per_pass > 0 and string.format(" (passes of up to %d tokens)", s.tokens_per_pass) or "",
    result.train.tokens_per_second, result.train.seconds_per_step))
end

-- Sampling: `prompts` random prompts of `prompt_len` tokens, n completions each, exactly
-- max_tokens new tokens; or with `ends` > 0, completions that end at any of `ends` token ids
-- spread over the vocabulary (random weights never draw the end-of-turn token), so that each
-- step ends about ends / vocabulary of the rows, up to max_tokens: lengths varied like a real
-- model's. Rows that end free their slots for the next prompts' rows (continuous batching;
-- `--set continuous=false`: groups of `group_size` prompts, each with its own cache, join the batch
-- in flight instead).
if not s.skip:find("sample") and not s.reference_only then
  local prompts, state = {}, 777
  for i = 1, s.prompts do
    local ids = {}
    for j = 1, s.prompt_len do state = (state * 1103515245 + 12345) % 2147483648; ids[j] = state % vocab end
    prompts[i] = ids
  end
  model:sample({ prompts[1] }, { max_tokens = 4 })
  local t0 = lab.sys.time()
  local stops = {}
  for i = 1, s.ends do stops[i] = (i * vocab) // (s.ends + 1) end
  local _, st = model:sample(prompts, { n = s.n, max_tokens = s.max_tokens, ignore_eos = s.ends == 0, seed = 1,
                                        batch_size = s.sample_batch, top_p = s.top_p, stop_token_ids = stops,
                                        group_size = s.group_size, continuous_batching = s.continuous })
  local secs = lab.sys.time() - t0
  result.sample = { generated_tokens_per_second = st.generated_tokens / secs, seconds = secs,
                    generated_tokens = st.generated_tokens }
  result.sample.decode_steps, result.sample.peak_rows = st.decode_steps, st.peak_rows
  print(string.format("loralab sample %d prompts x %d x %s tokens: %8.0f generated tok/s (%d tokens, %d steps)",
    s.prompts, s.n, s.ends > 0 and ("up to " .. s.max_tokens) or tostring(s.max_tokens),
    result.sample.generated_tokens_per_second, st.generated_tokens, st.decode_steps))
end

if s.python ~= "none" then
  local cmd = string.format("%s scripts/bench/reference_gpu.py --config %s --seq %d --batch %d --grad-accum %d --steps %d --r %d --lora-dropout %g --prompts %d --prompt-len %d --n %d --max-tokens %d --skip '%s'",
    s.python, s.config, s.seq, s.batch, s.grad_accum, s.steps, s.r, s.lora_dropout, s.ref_prompts > 0 and s.ref_prompts or s.prompts,
    s.prompt_len, s.n, s.max_tokens, s.skip)
  local ref = require("reference").run(cmd, s.out .. "/reference.json")
  result.reference = ref
  print("reference: " .. ref.stack .. " on " .. ref.gpu)
  if ref.train then
    print(string.format("  train  %8.0f tok/s, peak %.1f GiB; with gradient checkpointing %.0f tok/s, peak %.1f GiB",
      ref.train.tokens_per_second, ref.train.peak_gib, ref.train_checkpointing.tokens_per_second, ref.train_checkpointing.peak_gib))
  end
  if ref.sample then
    print(string.format("  sample %8.0f generated tok/s, peak %.1f GiB", ref.sample.generated_tokens_per_second, ref.sample.peak_gib))
  end
  if ref.train and result.train then
    print(string.format("  train: loralab / reference = %.2fx", result.train.tokens_per_second / ref.train.tokens_per_second))
  end
  if ref.sample and result.sample then
    print(string.format("  sample: loralab / reference = %.2fx", result.sample.generated_tokens_per_second / ref.sample.generated_tokens_per_second))
  end
end
lab.fs.write_json(s.out .. "/result.json", result)
