---@meta
-- lab.progress: a progress bar with ETA on a terminal; off a terminal each step prints a line.

---@class lab.progress
lab.progress = {}

---@class ProgressOptions
---@field label? string  Default "".

---@param total integer
---@param opts? ProgressOptions
---@return Progress
function lab.progress.new(total, opts) end

---@class Progress
local Progress = {}

---@param n? integer  Default 1.
---@param message? string
function Progress:inc(n, message) end

---@param message string
function Progress:message(message) end

function Progress:finish() end
