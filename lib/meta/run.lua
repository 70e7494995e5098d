---@meta
-- lab.run: an experiment's folder of cells. A cell's result is stored atomically in
-- <dir>/<name>-<key hash>/result.json; rerunning skips finished cells; a failing cell is retried
-- and then recorded in failed.json while the run goes on.

---@class lab.run
lab.run = {}

---@class RunOpenOptions
---@field settings? table  Resolved settings, written to <dir>/run.json with the loralab version.

---@param dir string
---@param opts? RunOpenOptions
---@return Run
function lab.run.open(dir, opts) end

--- 16 hex digits of the SHA-256 of a value's canonical JSON.
---@param value any
---@return string
function lab.run.hash(value) end

--- SHA-256 of a file's bytes.
---@param path string
---@return string
function lab.run.file_hash(path) end

---@class CellContext
---@field name string
---@field dir string               The cell's folder, for its files.
---@field attempt integer          1, 2, ...
---@field key any                  The key given.
---@field oom boolean              The previous attempt ran out of memory.
---@field previous_error? string

---@class CellOptions
---@field retries? integer  Extra attempts after a failure. Default 1.

---@class Run
local Run = {}

--- Runs `fn` unless a result for (name, key) is stored; returns the result and whether it was
--- reused, or nil and the error after the last failed attempt.
---@param name string
---@param key any      Everything that determines the result.
---@param fn fun(cell: CellContext): table
---@param opts? CellOptions
---@return table|nil result
---@return boolean|string reused_or_error
function Run:cell(name, key, fn, opts) end

---@return string
function Run:dir() end

---@return {done: integer, skipped: integer, failed: {name: string, error: string}[], seconds: number, dir: string}
function Run:summary() end
