---@meta
-- lab.fs: files a script writes and reads. Every write is atomic (temporary file in the same
-- folder, flushed, renamed over the target) and creates missing parent folders.

---@class lab.fs
---@field null lightuserdata  Written as JSON null; read_json gives it for null items of lists (null members of objects read as nil).
lab.fs = {}

---@class WriteJsonOptions
---@field pretty? boolean  Indented, one member per line. Default true.

--- Writes `text` to `path` atomically.
---@param path string
---@param text string
function lab.fs.write_text(path, text) end

--- The whole content of `path`.
---@param path string
---@return string
function lab.fs.read_text(path) end

--- Writes `value` as JSON: tables with keys exactly 1..n are lists, other tables objects with
--- keys sorted (integer keys as strings); an empty table is `[]`. NaN or infinity is an error
--- naming where it is.
---@param path string
---@param value any
---@param opts? WriteJsonOptions
function lab.fs.write_json(path, value, opts) end

--- Reads JSON: lists come back as Lua lists (and write back as lists), objects as tables.
---@param path string
---@return any
function lab.fs.read_json(path) end

--- Whether `path` exists (file or folder).
---@param path string
---@return boolean
function lab.fs.exists(path) end

--- Creates the folder `path` and its parents; no error if it exists.
---@param path string
function lab.fs.mkdir(path) end

--- Writes a CSV file: a header row, then one line per row. A row is a list in header order or a
--- table keyed by header names (missing keys give empty cells; unknown keys are an error).
--- Fields with commas, quotes or line breaks are quoted (RFC 4180).
---@param path string
---@param header string[]
---@param rows (any[]|table<string, any>)[]
function lab.fs.write_csv(path, header, rows) end
