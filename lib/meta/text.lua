---@meta
-- lab.text: regular expressions in Rust's regex syntax (https://docs.rs/regex: alternation
-- a|b, classes, \b word boundaries, (?i) to ignore case; no look-around or back-references),
-- which Lua patterns lack. Positions are 1-based byte positions, as in string.find; text need
-- not be valid UTF-8. Patterns are compiled once and kept.

---@class lab.text
lab.text = {}

--- The first match at or after `init` (default 1; negative counts from the end): its start and
--- end (inclusive) and its groups (false for a group that took no part), or nil.
---@param s string
---@param pattern string
---@param init? integer
---@return integer|nil start
---@return integer|nil stop
---@return string|false ... captures
function lab.text.find(s, pattern, init) end

--- The groups of the first match (the whole match when the pattern has none), or nil.
---@param s string
---@param pattern string
---@param init? integer
---@return string|nil ...
function lab.text.match(s, pattern, init) end

---@class TextMatch
---@field text string
---@field start integer
---@field stop integer
---@field captures (string|false)[]

--- Every non-overlapping match, in order.
---@param s string
---@param pattern string
---@return TextMatch[]
function lab.text.find_all(s, pattern) end

--- Replaces the matches (at most `n`); `$1` or `${name}` in `replacement` is a group, `$$` a
--- dollar sign. Returns the new string and the number of replacements.
---@param s string
---@param pattern string
---@param replacement string
---@param n? integer
---@return string
---@return integer
function lab.text.gsub(s, pattern, replacement, n) end

--- The pieces of `s` between matches of `pattern` (empty pieces kept).
---@param s string
---@param pattern string
---@return string[]
function lab.text.split(s, pattern) end

--- `s` with every regex metacharacter escaped, to match it literally.
---@param s string
---@return string
function lab.text.escape(s) end
