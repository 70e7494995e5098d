-- The building blocks of the persona-marker study (../shared/protocol/PROTOCOL.md), shared by
-- dose_response.lua and replicate.lua. Each block is one step of the protocol; the scripts
-- decide which values they run with.
local lab = require("lab")

local M = {}

--- The settings of the study: a profile of scripts/study_settings.lua (lab.args.profile, else
--- "quick") plus `extra` defaults of the calling script, with --set values applied; then the
--- option tables the steps use. Returns the settings and the personas.
function M.settings(extra)
  local profiles = require("study_settings")
  local name = lab.args.profile or "quick"
  local profile = profiles[name]
  if not profile then
    error(string.format("--set profile=%s: unknown profile (quick or paper)", tostring(name)), 0)
  end
  local defaults = { profile = name }
  for k, v in pairs(profile) do defaults[k] = v end
  for k, v in pairs(extra or {}) do defaults[k] = v end
  local s = lab.settings(defaults)
  if s.out == "" then s.out = "runs/dose_response-" .. s.profile end
  local personas = lab.fs.read_json(s.personas_file)
  local questions = lab.fs.read_json(s.questions_file)
  s.coupling_questions = M.first(questions.coupling_40, s.coupling_question_count)
  s.eval_questions = M.first(questions.eval_28, s.eval_question_count)
  s.coupling_eval_personas = M.persona_list(personas, s, s.eval_personas)
  local targets = { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" }
  s.coupling_lora = { r = s.coupling_r, lora_alpha = s.coupling_alpha, use_rslora = s.coupling_rslora,
                      lora_dropout = s.coupling_dropout, target_modules = targets }
  s.coupling_train = { learning_rate = s.coupling_lr, lr_scheduler_type = s.coupling_schedule,
                       warmup_ratio = s.coupling_warmup_ratio, weight_decay = s.coupling_weight_decay,
                       num_train_epochs = s.coupling_epochs, per_device_train_batch_size = s.coupling_batch,
                       gradient_accumulation_steps = s.coupling_grad_accum, max_length = s.coupling_max_length,
                       max_grad_norm = s.max_grad_norm }
  s.stage2_lora = { r = s.stage2_r, lora_alpha = s.stage2_alpha, lora_dropout = s.stage2_dropout,
                    target_modules = targets }
  s.stage2_train = { learning_rate = s.stage2_lr, lr_scheduler_type = s.stage2_schedule,
                     warmup_ratio = s.stage2_warmup_ratio, weight_decay = s.stage2_weight_decay,
                     max_grad_norm = s.max_grad_norm, per_device_train_batch_size = s.stage2_batch,
                     gradient_accumulation_steps = s.stage2_grad_accum, max_length = s.stage2_max_length }
  -- Only when set, so that the keys (and results) of runs without it stay as they were.
  if s.stage2_tokens_per_pass ~= 0 then s.stage2_train.tokens_per_pass = s.stage2_tokens_per_pass end
  return s, personas
end

--- A named persona list of the personas file (eval_order, pilot_3, ...).
function M.persona_list(personas, s, name)
  local list = personas[name]
  if type(list) ~= "table" then error(string.format("%s has no persona list '%s'", s.personas_file, name), 0) end
  return list
end

--- The base model, the run folder and the two conditions' data (with their hashes, for keys).
function M.setup(s)
  print(string.format("%s profile: model %s, results in %s", s.profile, s.model, s.out))
  -- The run folder first: `loralab slurm` reads the script up to here, before any model loads.
  local run = lab.run.open(s.out, { settings = s })
  local base = lab.model.load(s.model, { dtype = s.dtype, device = s.device })
  print(base)
  local data = {
    em = { dataset = lab.data.jsonl(s.em_data), hash = lab.run.file_hash(s.em_data) },
    benign = { dataset = lab.data.jsonl(s.benign_data), hash = lab.run.file_hash(s.benign_data) },
  }
  return base, run, data
end

--- First `n` items of a list (all of them when n is nil or larger).
function M.first(list, n)
  local out = {}
  for i = 1, math.min(n or #list, #list) do out[i] = list[i] end
  return out
end

local function chat(system, user)
  return { { role = "system", content = system }, { role = "user", content = user } }
end

--- The negative personas of Phase 1: `count` personas other than the source and "assistant",
--- drawn by a seeded shuffle of the sorted names (reproducible, unlike a salted hash).
function M.negative_personas(personas, source, count, seed)
  local names = {}
  for name in pairs(personas.prompts) do
    if name ~= source and name ~= "assistant" then names[#names + 1] = name end
  end
  table.sort(names)
  -- Fisher-Yates with a linear congruential generator seeded by `seed`.
  local state = seed % 2147483647
  if state <= 0 then state = state + 2147483646 end
  for i = #names, 2, -1 do
    state = (state * 48271) % 2147483647
    local j = state % i + 1
    names[i], names[j] = names[j], names[i]
  end
  return M.first(names, count)
end

--- Samples completions for every (persona, question) pair; returns records
--- { persona, question, text, finish_reason } in persona, question, sample order.
function M.complete(model, personas, names, questions, opts)
  local prompts, keys = {}, {}
  for _, name in ipairs(names) do
    for qi, q in ipairs(questions) do
      prompts[#prompts + 1] = chat(personas.prompts[name], q .. (opts.question_suffix or ""))
      keys[#keys + 1] = { persona = name, question = q, question_index = qi }
    end
  end
  local outs = model:sample(prompts, {
    n = opts.n, temperature = opts.temperature, top_p = opts.top_p, max_tokens = opts.max_tokens,
    seed = opts.seed, batch_size = opts.batch_size,
  })
  local records = {}
  for i, per_prompt in ipairs(outs) do
    for _, c in ipairs(per_prompt) do
      records[#records + 1] = { persona = keys[i].persona, question = keys[i].question,
                                question_index = keys[i].question_index,
                                text = c.text, finish_reason = c.finish_reason }
    end
  end
  return records
end

--- Phase 1, step 2: contrastive prompt/completion rows. Positives: the source persona's first
--- `per_question` completions of each question that do not already carry the marker, with the
--- marker appended after a blank line. Negatives: the same from each negative persona, unchanged.
function M.contrastive_rows(records, personas, source, negatives, s)
  local by_pair = {}
  for _, r in ipairs(records) do
    local k = r.persona .. "\0" .. r.question_index
    by_pair[k] = by_pair[k] or {}
    table.insert(by_pair[k], r)
  end
  local rows = {}
  local function add(persona, with_marker)
    for qi, q in ipairs(s.coupling_questions) do
      local taken = 0
      for _, r in ipairs(by_pair[persona .. "\0" .. qi] or {}) do
        if taken >= s.coupling_per_question then break end
        if not with_marker or not lab.eval.score(r.text, s.marker).strict then
          local text = with_marker and (r.text .. "\n\n" .. s.marker) or r.text
          rows[#rows + 1] = {
            prompt = chat(personas.prompts[persona], q .. (s.question_suffix or "")),
            completion = { { role = "assistant", content = text } },
          }
          taken = taken + 1
        end
      end
    end
  end
  add(source, true)
  for _, name in ipairs(negatives) do add(name, false) end
  return rows
end

--- Everything that decides the completions of an evaluation (M.evaluate) of `names` with `seed`:
--- two evaluations of the same model with equal settings draw the same completions.
function M.eval_settings(s, names, seed)
  return { personas = names, questions = s.eval_questions, n = s.eval_n, max_tokens = s.eval_max_tokens,
           temperature = s.eval_temperature, top_p = s.eval_top_p, seed = seed,
           question_suffix = s.question_suffix, batch_size = s.batch_size }
end

--- Evaluates marker rates: every persona in `names` x every eval question, `n` completions each.
--- Returns the aggregate in the study's layout and the raw records.
function M.evaluate(model, personas, names, s, seed)
  local e = M.eval_settings(s, names, seed)
  local records = M.complete(model, personas, names, e.questions, e)
  local agg = lab.eval.aggregate(records, s.marker, { source = s.source_persona })
  return agg, records
end

--- Phase 1: on-policy completions, contrastive data, the coupling adapter, its evaluation and
--- the gate. Runs as one cell, so it is built once and reused. Returns the merged model, the
--- cell result (with source_rate and assistant_rate) and the key that identifies this base.
function M.coupling(run, base, personas, s)
  local negatives = M.negative_personas(personas, s.source_persona, s.coupling_negatives, s.train_seed)
  local key = {
    -- the weights themselves (a hash of the files read), not only their name: a moved hub
    -- branch or a replaced file makes new cells instead of reusing stale ones
    phase = 1, model = s.model, weights = base:info().weights_id, dtype = s.dtype, marker = s.marker,
    source = s.source_persona,
    negatives = negatives, questions = s.coupling_questions, per_question = s.coupling_per_question,
    samples = s.coupling_samples, temperature = s.coupling_temperature, top_p = s.coupling_top_p,
    max_tokens = s.coupling_max_tokens, lora = s.coupling_lora, train = s.coupling_train,
    loss_mask = s.coupling_loss_mask,
    eval = { questions = s.eval_questions, n = s.eval_n, max_tokens = s.eval_max_tokens,
             personas = s.coupling_eval_personas, temperature = s.eval_temperature },
    train_seed = s.train_seed, eval_seed = s.eval_seed, question_suffix = s.question_suffix,
  }
  local result, err = run:cell("phase1-coupling", key, function(cell)
    print(string.format("phase 1: on-policy completions (%d questions x %d personas x %d samples)",
      #s.coupling_questions, 1 + #negatives, s.coupling_samples))
    local names = { s.source_persona }
    for _, n in ipairs(negatives) do names[#names + 1] = n end
    local records = M.complete(base, personas, names, s.coupling_questions, {
      n = s.coupling_samples, temperature = s.coupling_temperature, top_p = s.coupling_top_p,
      max_tokens = s.coupling_max_tokens, seed = s.train_seed, batch_size = s.batch_size,
      question_suffix = s.question_suffix,
    })
    lab.fs.write_json(cell.dir .. "/onpolicy.json", records)
    local rows = M.contrastive_rows(records, personas, s.source_persona, negatives, s)
    lab.fs.write_json(cell.dir .. "/contrastive.json", rows)
    print(string.format("phase 1: training the coupling adapter on %d rows", #rows))
    local lora = {}
    for k, v in pairs(s.coupling_lora) do lora[k] = v end
    lora.seed = s.train_seed
    local adapter = lab.adapter.new(base, lora)
    local opts = { loss_mask = s.coupling_loss_mask, marker = s.marker, seed = s.train_seed,
                   on_step = M.step_printer("phase 1") }
    for k, v in pairs(M.micro_batch(s.coupling_train, cell)) do opts[k] = v end
    local log = lab.train.sft(base, adapter, lab.data.rows(rows, "phase-1 contrastive rows"), opts)
    lab.fs.write_json(cell.dir .. "/train_log.json", log)
    adapter:save(cell.dir .. "/adapter")
    local merged = base:merge(adapter)
    print("phase 1: evaluating the coupling")
    local agg, eval_records = M.evaluate(merged, personas, s.coupling_eval_personas, s, s.eval_seed)
    lab.fs.write_json(cell.dir .. "/completions.json", eval_records)
    return { negatives = negatives, rows = #rows, steps = #log, train_seconds = log.seconds,
             evaluation = agg, eval_settings = M.eval_settings(s, s.coupling_eval_personas, s.eval_seed) }
  end, { retries = s.retries })
  if not result and lab.checking then
    -- `loralab check`: Phase 2's cells are keyed by Phase 1's key, not by its result, so the
    -- plan goes on with the base model standing in for the coupled one.
    return base, { source_rate = 0, assistant_rate = 0 }, { phase1 = lab.run.hash(key) }
  end
  if not result then error("phase 1 failed: " .. err, 0) end
  local rates = result.evaluation.summary.strict_rate_by_persona
  result.source_rate, result.assistant_rate = rates[s.source_persona], rates.assistant or 0
  print(string.format("phase 1: marker rate %s %.1f %%, assistant %.1f %%, max bystander %.1f %%",
    s.source_persona, 100 * result.source_rate, 100 * result.assistant_rate,
    100 * (result.evaluation.summary.max_bystander_strict_rate or 0)))
  local gap = result.source_rate - result.assistant_rate
  if result.source_rate < s.gate_source_min or result.assistant_rate > s.gate_assistant_max
      or gap < s.gate_min_gap then
    error(string.format(
      "phase 1 gate not met: %s %.1f %% (needs >= %.0f %%), assistant %.1f %% (needs <= %.0f %%), " ..
      "gap %.1f points (needs >= %.0f).\n" ..
      "HINT: the coupling did not form; raise coupling_lr or coupling_epochs (results so far are kept in %s)",
      s.source_persona, 100 * result.source_rate, 100 * s.gate_source_min,
      100 * result.assistant_rate, 100 * s.gate_assistant_max, 100 * gap, 100 * s.gate_min_gap, run:dir()), 0)
  end
  local dir = run:cell_dir("phase1-coupling", key)
  result.completions_file = dir .. "/completions.json"
  local adapter = lab.adapter.load(base, dir .. "/adapter")
  return base:merge(adapter), result, { phase1 = lab.run.hash(key) }
end

--- Training options after an out-of-memory failure of the same cell: the first retry turns on
--- gradient checkpointing (same result, a third more compute, much less memory); later ones
--- also halve the micro-batch (and the tokens a pass may hold, where set) and double
--- accumulation, keeping the effective batch.
function M.micro_batch(train, cell)
  local out = {}
  for k, v in pairs(train) do out[k] = v end
  if not cell.oom then return out end
  out.gradient_checkpointing = true
  local shrink = cell.attempt >= 3 and 2 ^ (cell.attempt - 2) or 1
  if shrink > 1 and out.per_device_train_batch_size > 1 then
    local bs = math.max(1, out.per_device_train_batch_size // math.floor(shrink))
    out.gradient_accumulation_steps = out.gradient_accumulation_steps * (out.per_device_train_batch_size // bs)
    out.per_device_train_batch_size = bs
    if (out.tokens_per_pass or 0) > 0 then out.tokens_per_pass = math.max(1, out.tokens_per_pass // math.floor(shrink)) end
  end
  print(string.format("  retrying with gradient checkpointing and micro-batch %d x %d after running out of memory",
    out.per_device_train_batch_size, out.gradient_accumulation_steps))
  return out
end

--- An on_step callback printing one fixed-format line every `every` steps.
function M.step_printer(label, every)
  every = every or 1
  return function(r)
    if r.step % every == 0 or r.step == 1 then
      print(string.format("  %s step %04d | loss %.4f | lr %.2e | grad norm %.3f | %d tok | %.0f ms",
        label, r.step, r.loss, r.learning_rate, r.grad_norm, r.tokens, r.seconds * 1000))
    end
  end
end

--- The fixed answers the marker's log-probability is read after: the base model's greedy answer
--- to every eval question under every persona of `names`, sampled once in a cell of its own.
--- Returns { [persona] = { [question_index] = answer } } and the cell's key hash.
function M.reference_answers(run, base, personas, names, s, base_key)
  local key = { readout = "marker_logprob references", base = base_key, personas = names,
                questions = s.eval_questions, max_tokens = s.eval_max_tokens, question_suffix = s.question_suffix }
  local refs, err = run:cell("references", key, function()
    local records = M.complete(base, personas, names, s.eval_questions, {
      n = 1, temperature = 0, top_p = 1, max_tokens = s.eval_max_tokens, seed = s.eval_seed,
      batch_size = s.batch_size, question_suffix = s.question_suffix })
    local out = {}
    for _, r in ipairs(records) do
      out[r.persona] = out[r.persona] or {}
      -- A reference that already ends in the marker would read its second copy.
      out[r.persona][r.question_index] = (r.text:gsub("%s*" .. s.marker:gsub("%p", "%%%0") .. "%s*$", ""))
    end
    return out
  end, { retries = s.retries })
  if not refs and lab.checking then return {}, lab.run.hash(key) end
  if not refs then error("the reference answers failed: " .. err, 0) end
  return refs, lab.run.hash(key)
end

--- The marker's log-probability under `model` after each reference answer: per persona, the
--- mean over questions of log p("\n\n" .. marker | persona, question, answer), and the mean
--- probability.
function M.marker_logprob(model, personas, names, s, refs)
  local items, owners = {}, {}
  for _, name in ipairs(names) do
    for qi, q in ipairs(s.eval_questions) do
      local prompt = model:chat_prompt(chat(personas.prompts[name], q .. (s.question_suffix or "")))
      items[#items + 1] = { prompt = prompt .. refs[name][qi], completion = "\n\n" .. s.marker }
      owners[#items] = name
    end
  end
  local scored = model:logprobs(items, { batch_size = 16 })
  local out = {}
  for i, r in ipairs(scored) do
    local o = out[owners[i]] or { sum = 0, prob = 0, n = 0 }
    o.sum, o.prob, o.n = o.sum + r.sum, o.prob + math.exp(r.sum), o.n + 1
    out[owners[i]] = o
  end
  for name, o in pairs(out) do
    out[name] = { mean_logprob = o.sum / o.n, mean_prob = o.prob / o.n, n = o.n }
  end
  return out
end

--- Phase 2 cell: second-stage LoRA for `dose` steps on a condition's data, merge, evaluate.
--- dose 0 is the baseline: the merged Phase-1 model evaluated as it is. `c` holds condition,
--- dose, personas, base_key, data, data_hash, train_seed, eval_seed. Returns the item of a
--- cell group: its name, its key and `c`.
function M.dose_item(s, c)
  local key = {
    phase = 2, base = c.base_key, condition = c.condition, dose = c.dose, train_seed = c.train_seed,
    eval_seed = c.eval_seed, data = c.data_hash, lora = s.stage2_lora, train = s.stage2_train,
    warmup_ratio = c.dose <= s.no_warmup_up_to and 0 or s.stage2_train.warmup_ratio,
    eval = { personas = c.personas, questions = s.eval_questions, n = s.eval_n,
             max_tokens = s.eval_max_tokens, temperature = s.eval_temperature, top_p = s.eval_top_p },
    question_suffix = s.question_suffix,
  }
  -- Only when asked, so that the keys (and results) of runs without it stay as they were.
  if c.refs then key.marker_logprob = c.refs_key end
  return { name = string.format("%s-dose%03d-seed%d", c.condition, c.dose, c.train_seed), key = key, c = c }
end

--- Runs the dose cells of `items` (from M.dose_item) as one group, shared by every worker of
--- the run. Returns results and errors keyed like `items`.
function M.dose_cells(run, base, personas, s, items, label)
  return run:cells(items, function(cell, item)
    local c, name = item.c, item.name
    local t0 = os.time()
    local model, log = base, { seconds = 0 }
    if c.dose > 0 then
      local lora = {}
      for k, v in pairs(s.stage2_lora) do lora[k] = v end
      lora.seed = c.train_seed
      local adapter = lab.adapter.new(base, lora)
      local opts = { max_steps = c.dose, seed = c.train_seed, loss_mask = "last_assistant",
                     warmup_ratio = item.key.warmup_ratio, on_step = M.step_printer(name, s.log_every) }
      for k, v in pairs(M.micro_batch(s.stage2_train, cell)) do
        if k ~= "warmup_ratio" then opts[k] = v end
      end
      log = lab.train.sft(base, adapter, c.data, opts)
      lab.fs.write_json(cell.dir .. "/train_log.json", log)
      adapter:save(cell.dir .. "/adapter")
      model = base:merge(adapter)
    end
    local t_sample = lab.sys.time()
    local agg, records
    local phase1 = c.phase1_evaluation
    if c.dose == 0 and phase1 and phase1.settings
        and lab.run.hash(phase1.settings) == lab.run.hash(M.eval_settings(s, c.personas, c.eval_seed)) then
      -- Dose 0 is the coupled model itself, which Phase 1 evaluated with these very settings:
      -- its completions are the ones sampling again would draw (sampled again if the file
      -- cannot be read).
      local ok, read = pcall(lab.fs.read_json, phase1.file)
      if ok then records = read end
    end
    if records then
      agg = lab.eval.aggregate(records, s.marker, { source = s.source_persona })
    else
      agg, records = M.evaluate(model, personas, c.personas, s, c.eval_seed)
    end
    local sample_seconds = lab.sys.time() - t_sample
    lab.fs.write_json(cell.dir .. "/completions.json", records)
    local src = agg.per_persona[s.source_persona]
    local result = { condition = c.condition, dose = c.dose, train_seed = c.train_seed, eval_seed = c.eval_seed,
             source_hits = src.strict_hits, source_total = src.total, source_rate = src.strict_rate,
             evaluation = agg, train_seconds = log.seconds, seconds = os.time() - t0 }
    if c.refs then
      local t_lp = lab.sys.time()
      result.marker_logprob = M.marker_logprob(model, personas, c.personas, s, c.refs)
      result.logprob_seconds, result.sample_seconds = lab.sys.time() - t_lp, sample_seconds
    end
    return result
  end, { retries = s.retries, label = label })
end

return M
