-- A study of the same shape as dose_response.lua, small enough for tests of workers and Slurm:
-- one cell first (like Phase 1), then a group of independent cells that each train a LoRA on a
-- tiny seeded random model and sample from it, then a summary written once.
--   loralab run tests/scripts/scale_out.lua --set out=/tmp/x --workers 2
local lab = require("lab")
local s = lab.settings({ out = "runs/scale_out", cells = 6, steps = 4, pause = 0.2, fail = "" })
local run = lab.run.open(s.out, { settings = s })
local model = lab.model.random({ architectures = { "Qwen2ForCausalLM" }, vocab_size = 50, hidden_size = 16,
  intermediate_size = 32, num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1,
  max_position_embeddings = 64 }, { seed = 7 })
local rows = lab.data.rows({ { input_ids = { 1, 2, 3, 4, 5 } }, { input_ids = { 5, 6, 7, 8 } } })

local function train_and_sample(cell, seed)
  local adapter = lab.adapter.new(model, { r = 2, target_modules = { "all-linear" }, seed = seed })
  local log = lab.train.sft(model, adapter, rows, { max_steps = s.steps, per_device_train_batch_size = 2,
    seed = seed, on_step = function() lab.sys.sleep(s.pause) end })
  local outs = model:merge(adapter):sample({ { 1, 2, 3 } }, { n = 2, max_tokens = 6, ignore_eos = true, seed = seed })
  return { loss = log[#log].loss, text = outs[1][1].text .. "|" .. outs[1][2].text }
end

local first = assert(run:cell("first", { seed = 0 }, function(cell) return train_and_sample(cell, 1000) end))

local items = {}
for i = 1, s.cells do items[i] = { name = "dose" .. i, key = { i = i, steps = s.steps, first = first.loss }, seed = i } end
local results, errors = run:cells(items, function(cell, item)
  if item.name == s.fail then error("this cell fails on purpose") end
  return train_and_sample(cell, item.seed)
end, { label = "group" })

local summary, err = run:cell("summary", { results = results, errors = errors }, function()
  local n = 0
  for _ in pairs(results) do n = n + 1 end
  lab.fs.write_json(s.out .. "/summary.json", { finished = n, results = results })
  return { finished = n }
end)
print(string.format("finished %d of %d", summary.finished, s.cells))
