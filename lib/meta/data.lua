---@meta
-- lab.data: training rows. A row is {messages = {...}}, {prompt = ..., completion = ...}
-- (lists of messages or plain strings), {text = "..."} or {input_ids = {...}} (already
-- tokenized; every token trained).

---@class lab.data
lab.data = {}

---@class JsonlOptions
---@field on_error? "raise"|"skip"  A malformed line: an error naming file and line, or skipped with a warning. Default "raise".

--- Reads a JSONL file, one row per line.
---@param path string
---@param opts? JsonlOptions
---@return Dataset
function lab.data.jsonl(path, opts) end

--- A dataset from Lua tables; `name` appears in error messages.
---@param rows table[]
---@param name? string
---@return Dataset
function lab.data.rows(rows, name) end

---@class Dataset
local Dataset = {}

---@return integer
function Dataset:len() end

---@return string
function Dataset:source() end

--- Row `i` (1-based) as a table.
---@param i integer
---@return table
function Dataset:row(i) end

--- The first `n` rows.
---@param n integer
---@return Dataset
function Dataset:take(n) end
