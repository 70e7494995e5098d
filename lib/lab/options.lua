--- lab.options: strict option tables for functions written in Lua.
---
--- The Rust side of `lab` rejects a misspelt option key with the closest known one; the pure-Lua
--- modules (lab.figure) and your own helpers do the same through `check`, so a typo is
--- an error at the line that made it, never a silently ignored setting.

local M = {}

--- Levenshtein distance; option names are short, so the quadratic table is fine.
local function edit_distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      local cost = (a:sub(i, i) == b:sub(j, j)) and 0 or 1
      cur[j] = math.min(prev[j - 1] + cost, prev[j] + 1, cur[j - 1] + 1)
    end
    prev = cur
  end
  return prev[#b]
end

--- The known name within edit distance 2 of `name`, if any.
local function closest(name, known)
  local best, best_d = nil, 3
  for _, k in ipairs(known) do
    local d = edit_distance(name, k)
    if d < best_d then best, best_d = k, d end
  end
  return best
end

--- Checks that every key of `opts` is one of `known`; returns `opts`, or `{}` for nil.
--- `context` names the function (and the table within it) in the error.
function M.check(opts, known, context)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error(string.format("%s: options must be a table, got %s", context, type(opts)), 0)
  end
  local set = {}
  for _, k in ipairs(known) do set[k] = true end
  for k in pairs(opts) do
    if type(k) ~= "string" then
      error(string.format("%s: option keys must be names, got a %s key", context, type(k)), 0)
    end
    if not set[k] then
      local msg = string.format("%s: unknown option '%s'", context, k)
      local guess = closest(k, known)
      if guess then msg = msg .. string.format(" (did you mean '%s'?)", guess) end
      local sorted = {}
      for _, name in ipairs(known) do sorted[#sorted + 1] = name end
      table.sort(sorted)
      error(msg .. ". Known options: " .. table.concat(sorted, ", "), 0)
    end
  end
  return opts
end

--- Checks that `value` is a non-empty list (keys exactly 1..n); returns it.
function M.list(value, what, context)
  if type(value) ~= "table" then
    error(string.format("%s: %s must be a list, got %s", context, what, type(value)), 0)
  end
  local n = 0
  for _ in pairs(value) do n = n + 1 end
  if n == 0 or n ~= #value then
    error(string.format("%s: %s must be a non-empty list { {...}, {...} }", context, what), 0)
  end
  return value
end

return M
