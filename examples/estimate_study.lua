-- Wall time of the whole `paper` profile (phases 1-3 of scripts/dose_response.lua) on one GPU
-- or on N (`--set gpus=4`: one worker per GPU, `loralab run --gpus` or a Slurm array), from
-- measured throughputs: the work is counted from the profile's settings and data, and divided
-- by the training and sampling rates that examples/bench_gpu.lua measured.
--
--   loralab run examples/estimate_study.lua --set train_tokens_per_second=14572 \
--       --set phase1_train_tokens_per_second=14405 --set sample_tokens_per_second=32648 --set gpus=4
--
-- With N workers, Phase 1 is one cell and runs alone; the cells of Phase 2, then those of Phase
-- 3, are claimed in the script's order by whichever worker is free, which is what is simulated
-- here (each worker also loads the model once: `load_seconds`).
--
-- Training rates by row length: phases 2 and 3 train on the data rows (~113 tokens, 212 at
-- most), Phase 1 on prompts with their on-policy completions (~570 tokens). The defaults are
-- the H100's with the study's LoRA dropout of 0.05 (7B shape, examples/bench_gpu.lua) at
-- its rows' lengths: for phases 2 and 3, 128-token rows, a step's 16 rows in one pass (as the
-- profile's stage2_tokens_per_pass of 4096 takes these data); for Phase 1, 576-token rows four
-- a pass. Sampling: 1680 rows at once, the profile's batch_size, every completion 512 tokens.
--
-- Completions are counted at `completion_tokens` each (default: the profile's max_tokens, 512,
-- an upper bound: the study's answers end earlier). Token counts of the data rows use the
-- embedded model's tokenizer as a stand-in for Qwen2.5's (both are byte-level BPEs of similar
-- vocabulary for English). The critical dose of phase 3 is the study's (10) unless set.
package.path = "scripts/?.lua;" .. package.path
local lab = require("lab")
local study = require("persona_marker")
lab.args.profile = lab.args.profile or "paper" -- the profile being estimated
local s = study.settings({
  train_tokens_per_second = 14572, phase1_train_tokens_per_second = 14405, sample_tokens_per_second = 32648,
  completion_tokens = 0, phase1_completion_tokens = 0, critical = 10, reference_hours = 5,
  gpus = 1, load_seconds = 0,
})

local tok = lab.model.load()
local function row_tokens(path, cap)
  local data, total = lab.data.jsonl(path), 0
  for i = 1, data:len() do
    local row = data:row(i)
    local n = #tok:encode(tok:chat_prompt(row.messages, { add_generation_prompt = false }))
    total = total + math.min(n, cap)
  end
  return total / data:len()
end

local eval_completion = s.completion_tokens > 0 and s.completion_tokens or s.eval_max_tokens
local phase1_completion = s.phase1_completion_tokens > 0 and s.phase1_completion_tokens or s.coupling_max_tokens
local eval_cell = #s.eval_questions * #s.coupling_eval_personas * s.eval_n -- completions per cell
local pilot_cell = #s.eval_questions * #study.persona_list(lab.fs.read_json(s.personas_file), s, s.pilot_personas) * s.eval_n
local rows_per_step = s.stage2_batch * s.stage2_grad_accum

-- Phase 1: on-policy completions, the coupling adapter, its evaluation.
local personas1 = 1 + s.coupling_negatives
local gen1 = #s.coupling_questions * personas1 * s.coupling_samples
local rows1 = #s.coupling_questions * s.coupling_per_question * personas1
local steps1 = math.ceil(rows1 / (s.coupling_batch * s.coupling_grad_accum)) * s.coupling_epochs
local prompt1 = 60 -- system prompt and question, in tokens
local train1 = steps1 * s.coupling_batch * s.coupling_grad_accum * math.min(prompt1 + phase1_completion, s.coupling_max_length)

-- Phase 2: baseline, pilot doses (pilot personas), the titration for both conditions.
local row2 = (row_tokens(s.em_data, s.stage2_max_length) + row_tokens(s.benign_data, s.stage2_max_length)) / 2
local steps2, cells2, sampled2 = 0, 1, eval_cell
for _, d in ipairs(s.pilot_doses) do steps2, cells2, sampled2 = steps2 + d, cells2 + 1, sampled2 + pilot_cell end
for _, d in ipairs(s.doses) do steps2, cells2, sampled2 = steps2 + 2 * d, cells2 + 2, sampled2 + 2 * eval_cell end

-- Phase 3: the other seeds at the critical dose (the train seed's cells are phase 2's).
local new_seeds = 0
for _, seed in ipairs(s.seeds) do if seed ~= s.train_seed then new_seeds = new_seeds + 1 end end
local steps3, cells3, sampled3 = 2 * new_seeds * s.critical, 2 * new_seeds, 2 * new_seeds * eval_cell

local function seconds(train_tokens, sampled_tokens, train_rate)
  return train_tokens / (train_rate or s.train_tokens_per_second) + sampled_tokens / s.sample_tokens_per_second
end

-- The cells of phases 2 and 3, in the script's order, as seconds each.
local cells_p2 = { seconds(0, eval_cell * eval_completion) }
for _, d in ipairs(s.pilot_doses) do cells_p2[#cells_p2 + 1] = seconds(d * rows_per_step * row2, pilot_cell * eval_completion) end
for _, d in ipairs(s.doses) do
  for _ = 1, 2 do cells_p2[#cells_p2 + 1] = seconds(d * rows_per_step * row2, eval_cell * eval_completion) end
end
local cells_p3 = {}
for _ = 1, 2 * new_seeds do cells_p3[#cells_p3 + 1] = seconds(s.critical * rows_per_step * row2, eval_cell * eval_completion) end

-- Wall time of a group on `n` workers: each cell goes, in order, to the worker free first.
local function makespan(cells, n)
  local free = {}
  for i = 1, n do free[i] = 0 end
  for _, c in ipairs(cells) do
    table.sort(free)
    free[1] = free[1] + c
  end
  return math.max(table.unpack(free))
end

local rows = {
  { "phase 1: on-policy completions", 0, gen1 * phase1_completion },
  { "phase 1: coupling adapter (" .. steps1 .. " steps)", train1, 0, s.phase1_train_tokens_per_second },
  { "phase 1: evaluation", 0, eval_cell * eval_completion },
  { string.format("phase 2: %d cells, %d steps", cells2, steps2), steps2 * rows_per_step * row2, sampled2 * eval_completion, group = cells_p2 },
  { string.format("phase 3: %d cells, %d steps", cells3, steps3), steps3 * rows_per_step * row2, sampled3 * eval_completion, group = cells_p3 },
}
print(string.format("paper profile on %d GPU(s): training at %.0f tok/s (phase 1: %.0f), sampling at %.0f generated tok/s",
  s.gpus, s.train_tokens_per_second, s.phase1_train_tokens_per_second, s.sample_tokens_per_second))
print(string.format("completions of %d tokens (phase 1: %d); data rows of %.0f tokens on average",
  eval_completion, phase1_completion, row2))
print(string.format("%-40s %14s %16s %10s %10s", "", "trained tokens", "sampled tokens", "GPU-hours", "hours"))
local total_h, total_gpu_h = s.load_seconds / 3600, s.load_seconds / 3600
for _, r in ipairs(rows) do
  local gpu_h = seconds(r[2], r[3], r[4]) / 3600
  local h = r.group and makespan(r.group, s.gpus) / 3600 or gpu_h
  total_h, total_gpu_h = total_h + h, total_gpu_h + gpu_h
  print(string.format("%-40s %14.0f %16.0f %10.2f %10.2f", r[1], r[2], r[3], gpu_h, h))
end
print(string.format("%-40s %14s %16s %10.2f %10.2f  (%.1f minutes)", "total", "", "", total_gpu_h, total_h, 60 * total_h))
print(string.format("the study's pipeline: ~%g H100-hours; ratio %.1fx", s.reference_hours, s.reference_hours / total_h))
