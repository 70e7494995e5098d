---@meta
-- The root module of loralab: `local lab = require("lab")`. Each noun is a sub-table
-- (lab.model, lab.adapter, lab.data, lab.train, lab.run, lab.stats, lab.eval, lab.text, lab.plot,
-- lab.figure, lab.fs, lab.progress, lab.sys, lab.options).

---@class lab
---@field version string                 The loralab version.
---@field args table<string, any>        Every `--set KEY=VALUE` of the command line; numbers and booleans converted.
---@field script_dir string              The folder of the running script, as given on the command line. Relative
---                                      paths (lab.data.jsonl("x.jsonl"), lab.fs...) resolve from the working
---                                      directory; lab.script_dir .. "/x.jsonl" names a file beside the script.
---@field checking boolean               True under `loralab check`: models are described, not loaded, and no
---                                      cell runs (a script may skip its own summary then).
lab = {}

--- A copy of `defaults` with the command line's `--set` values applied, each converted to the
--- type of its default (a list default takes "a,b,c"). An unknown key is an error that lists the
--- script's settings.
---@param defaults table<string, any>
---@return table<string, any>
function lab.settings(defaults) end

return lab
