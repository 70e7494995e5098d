-- What the side-by-side benchmarks share: running the Python reference stack and reading its
-- result (`require("reference")` from a script in this folder).
local lab = require("lab")

local M = {}

--- Runs `cmd`, which prints one JSON object last; saves that object to `path` and returns it.
function M.run(cmd, path)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("a")
  p:close()
  local json = out:match("(%b{})%s*$")
  if not json then error("the reference run printed no result; run it by hand:\n  " .. cmd .. "\n" .. out, 0) end
  lab.fs.write_text(path, json)
  return lab.fs.read_json(path)
end

--- The embedded default model's GGUF file in loralab's cache, which the reference loads too.
function M.default_gguf()
  return (os.getenv("LORALAB_CACHE") or (os.getenv("HOME") .. "/.cache/loralab")) ..
         "/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
end

return M
