-- A profile's LoRA and training option tables (scripts/study_settings.lua, as
-- persona_marker.settings builds them) taken by lab.adapter.new and lab.train.sft for one step
-- on a tiny random model whose projections are as wide as the profiles' rank of 32: a misspelt
-- or unknown option in a profile fails here rather than hours into a study.
--   loralab run tests/scripts/profile_options.lua --set profile=paper
package.path = "scripts/?.lua;" .. package.path
local lab = require("lab")
local study = require("persona_marker")
local s = study.settings()
local model = lab.model.random({ architectures = { "Qwen2ForCausalLM" }, vocab_size = 50, hidden_size = 64,
  intermediate_size = 128, num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1,
  max_position_embeddings = 64 }, { seed = 7 })
local rows = lab.data.rows({ { input_ids = { 1, 2, 3, 4, 5 } }, { input_ids = { 5, 6, 7, 8 } } })
for _, phase in ipairs({ { "phase 1", s.coupling_lora, s.coupling_train }, { "phase 2", s.stage2_lora, s.stage2_train } }) do
  local name, lora, train = phase[1], phase[2], phase[3]
  local opts = { max_steps = 1 }
  for k, v in pairs(train) do opts[k] = v end
  opts.num_train_epochs = nil -- one step, whatever the epochs
  local log = lab.train.sft(model, lab.adapter.new(model, lora), rows, opts)
  print(string.format("profile %s, %s: options accepted, %d step", s.profile, name, #log))
end
