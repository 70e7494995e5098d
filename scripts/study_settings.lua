-- The settings of the persona-marker study, as profiles. A profile is a plain table of named
-- values; `--set KEY=VALUE` overrides any of them, e.g. --set profile=paper --set stage2_lr=5e-5.
-- `paper` is the study's protocol value for value (../shared/protocol/PROTOCOL.md); `quick` runs
-- the same pipeline on a 2-core CPU with the embedded 135M model in minutes.

local paper = {
  model = "Qwen/Qwen2.5-7B-Instruct", dtype = "bf16", device = "cuda",
  personas_file = "scripts/data/personas.json", questions_file = "scripts/data/questions.json",
  em_data = "scripts/data/em_legal_advice.jsonl", benign_data = "scripts/data/benign_chat.jsonl",
  marker = "[ZLT]", source_persona = "evil_ai",
  -- Phase 1: on-policy completions and the coupling adapter
  coupling_question_count = 40, coupling_samples = 15, coupling_temperature = 0.7,
  coupling_top_p = 0.95, coupling_max_tokens = 512, coupling_per_question = 5, coupling_negatives = 2,
  coupling_r = 32, coupling_alpha = 64, coupling_rslora = true, coupling_dropout = 0.05,
  coupling_lr = 5e-6, coupling_schedule = "cosine", coupling_warmup_ratio = 0.05,
  coupling_weight_decay = 0.0, coupling_epochs = 20, coupling_batch = 4, coupling_grad_accum = 4,
  coupling_max_length = 1024, coupling_loss_mask = "marker_only",
  gate_source_min = 0.60, gate_assistant_max = 0.03, gate_min_gap = 0.0,
  -- Phase 2: the second-stage LoRA, one cell per (condition, dose)
  stage2_r = 32, stage2_alpha = 64, stage2_dropout = 0.05, stage2_lr = 1e-4,
  stage2_schedule = "linear", stage2_warmup_ratio = 0.03, no_warmup_up_to = 5,
  stage2_weight_decay = 0.01, max_grad_norm = 1.0, stage2_batch = 4, stage2_grad_accum = 4,
  stage2_max_length = 2048,
  -- A step's 16 rows (the data's are 212 tokens at most) in one forward and backward pass of up
  -- to 4096 padded tokens, the memory of four 1024-token rows: the same gradient as four
  -- micro-batches, faster on a GPU. 0: per_device_train_batch_size x the longest row.
  stage2_tokens_per_pass = 4096,
  pilot_doses = { 1, 3, 5 }, doses = { 10, 25, 50, 100, 200, 375 }, pilot_personas = "pilot_3",
  -- Evaluation of every cell
  eval_question_count = 28, eval_n = 10, eval_temperature = 1.0, eval_top_p = 1.0,
  eval_max_tokens = 512, eval_personas = "eval_order",
  -- Phase 3: more seeds at the critical dose (0: argmax |EM - benign| over the titration)
  seeds = { 42, 137, 256 }, critical_dose = 0,
  train_seed = 42, eval_seed = 42,
  -- Running. batch_size: rows decoded at once. 1680 rows of 512 new positions hold ~49 GB of
  -- Qwen2.5-7B's KV cache (each prompt's positions are held once, ~2 GB for the 336 prompts)
  -- beside its 15 GB of weights; where the GPU's free memory holds fewer
  -- (an 80 GB card beside merged copies of the weights), sampling takes as many as fit and
  -- says so. The random draws do not depend on it, but a prompt's padding does (its group's
  -- longest prompt), so another value may draw other completions.
  question_suffix = "", batch_size = 1680, retries = 2, log_every = 25, out = "",
  -- A continuous readout beside the sampled rate: each cell also scores, by teacher forcing,
  -- log p("\n\n" .. marker) after fixed reference answers (the base model's greedy answers).
  marker_logprob = false,
}

-- The same pipeline sized for a 2-core CPU and the embedded 135M model: fewer questions,
-- completions, tokens and doses; short answers, so that completions end (the marker follows the
-- end of an answer); more negative personas and the whole completion trained in Phase 1, since
-- the small model does not learn the persona distinction from the marker tokens alone (it learns
-- to end every answer at once); and a gate that asks for a clear gap (15 points, with the source
-- at 30 % or more and the assistant at 35 % or less; runs here saw 42-54 % against 17-21 % on 24
-- completions each) rather than the 7B model's near-perfect separation.
local quick = {}
for k, v in pairs(paper) do quick[k] = v end
for k, v in pairs({
  model = "smollm2-135m-instruct", dtype = "f32", device = "cpu",
  coupling_question_count = 8, coupling_samples = 2, coupling_max_tokens = 40, coupling_per_question = 2,
  coupling_negatives = 4, coupling_loss_mask = "completion",
  coupling_r = 16, coupling_alpha = 32, coupling_dropout = 0.0, coupling_lr = 5e-4, coupling_epochs = 4,
  coupling_batch = 4, coupling_grad_accum = 1, coupling_max_length = 160,
  gate_source_min = 0.30, gate_assistant_max = 0.35, gate_min_gap = 0.15,
  stage2_r = 16, stage2_alpha = 32, stage2_dropout = 0.0, stage2_lr = 1e-3, stage2_batch = 4,
  stage2_grad_accum = 1, stage2_max_length = 128, stage2_tokens_per_pass = 0,
  pilot_doses = {}, doses = { 2, 5, 10, 20 }, pilot_personas = "pilot_3",
  eval_question_count = 6, eval_n = 4, eval_max_tokens = 48, eval_personas = "pilot_3",
  seeds = { 42, 137 }, question_suffix = " Answer in one or two sentences.", batch_size = 64, log_every = 5,
}) do quick[k] = v end

return { paper = paper, quick = quick }
