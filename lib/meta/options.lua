---@meta
-- lab.options: strict option tables for functions written in Lua (yours too), with the messages
-- and suggestions of the Rust functions' own options.

---@class lab.options
lab.options = {}

--- Errors if `opts` has a key not in `known` (suggesting the closest known one); returns
--- `opts`, or `{}` when it is nil. `context` names the function in the message.
---@generic T: table
---@param opts T|nil
---@param known string[]
---@param context string
---@return T
function lab.options.check(opts, known, context) end

--- Errors unless `value` is a non-empty list; returns it. `what` and `context` name it.
---@generic T: table
---@param value T
---@param what string
---@param context string
---@return T
function lab.options.list(value, what, context) end
