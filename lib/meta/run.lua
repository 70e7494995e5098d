---@meta
-- lab.run: an experiment's folder of cells. A cell's result is stored atomically in
-- <dir>/<name>-<key hash>/result.json; rerunning skips finished cells; a failing cell is retried
-- and then recorded in failed.json while the run goes on.
--
-- Several workers may run the same script on the same folder (`loralab run --workers N`,
-- `--gpus 0,1,2,3`, `loralab slurm`): the cells of a group (`run:cells`) are shared out among
-- them through leases in the cell folders, and every worker gets the same results back. A cell
-- may write only inside its own folder (`cell.dir`); run.json keeps every settings set used.

---@class lab.run
lab.run = {}

---@class RunOpenOptions
---@field settings? table  Resolved settings, written to <dir>/run.json with the script and the
---                        loralab version (earlier settings sets are kept in its `history`).
---                        Refused while other workers run the folder with other settings.

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

---@class CellItem
---@field name string  The cell's name (a plain folder name).
---@field key any      Everything that determines the result.

---@class CellOptions
---@field retries? integer  Extra attempts after a failure. Default 1.

---@class CellsOptions
---@field retries? integer  Extra attempts after a failure. Default 1.
---@field label? string     Prefix of the progress lines ("cells: 3/16 cells finished or failed"). Default "cells".

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

--- Runs a group of independent cells and returns their results and errors, both keyed like
--- `list` (an array, or a table with string keys). Each item is a table with `name` and `key`
--- (and any other fields); `fn(cell, item)` computes one result. In one process the cells run in
--- list order; with several workers each runs the cells nobody holds, reads back the others'
--- results and waits until every cell is finished or failed. A cell that failed after its retries
--- is failed for every worker of the launch; a later run retries it.
---@param list CellItem[]|table<string, CellItem>
---@param fn fun(cell: CellContext, item: CellItem): table
---@param opts? CellsOptions
---@return table results  result per item, keyed like list (missing where the cell failed)
---@return table errors   error message per failed item, keyed like list
function Run:cells(list, fn, opts) end

--- The folder of the cell (name, key): the same rule as `Run:cell`.
---@param name string
---@param key any
---@return string
function Run:cell_dir(name, key) end

--- Who this process is: host, pid, Slurm job ("ARRAYJOB_TASK"), worker name and launch id.
---@return {host: string, pid: integer, job: string|nil, worker: string|nil, launch: string}
function Run:worker() end

---@return string
function Run:dir() end

---@return {done: integer, skipped: integer, failed: {name: string, error: string}[], seconds: number, dir: string}
function Run:summary() end
