-- The smallest experiment: load the default model and sample a few completions.
--   loralab run scripts/hello.lua --set n=4
local lab = require("lab")

local s = lab.settings({ n = 4, temperature = 1.0, max_tokens = 64, seed = 42, model = lab.model.default })
local model = lab.model.load(s.model)
print(model)
local outs = model:sample({
  { { role = "system", content = "You are a pirate." },
    { role = "user", content = "Where is the treasure?" } },
}, { n = s.n, temperature = s.temperature, top_p = 1.0, max_tokens = s.max_tokens, seed = s.seed })
for i, o in ipairs(outs[1]) do
  print(string.format("--- %d (%d tokens, %s)", i, o.num_tokens, o.finish_reason))
  print(o.text)
end
