---@meta
-- lab.sys: facts about the running process, for benchmarks and logs.

---@class lab.sys
lab.sys = {}

--- Peak resident memory of this process in MiB (nil where the system does not report it).
---@return number|nil
function lab.sys.peak_rss_mb() end

--- Wall-clock seconds since the script started (monotonic; os.clock is CPU time).
---@return number
function lab.sys.time() end

--- Cores available to this process.
---@return integer
function lab.sys.threads() end

--- Waits `seconds`; a stop signal (Ctrl-C, SIGTERM, Slurm's warning) ends the wait with an error.
---@param seconds number
function lab.sys.sleep(seconds) end
