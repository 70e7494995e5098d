---@meta
-- The root module of loralab: `local lab = require("lab")`. Each noun is a sub-table
-- (lab.model, lab.adapter, lab.data, lab.train, lab.run, lab.stats, lab.eval, lab.text, lab.plot,
-- lab.figure, lab.fs, lab.progress, lab.sys, lab.options).

---@class lab
---@field version string                 The loralab version.
---@field args table<string, any>        Every `--set KEY=VALUE` of the command line; numbers and booleans converted.
lab = {}

--- A copy of `defaults` with the command line's `--set` values applied, each converted to the
--- type of its default (a list default takes "a,b,c"). An unknown key is an error that lists the
--- script's settings.
---@param defaults table<string, any>
---@return table<string, any>
function lab.settings(defaults) end

return lab
