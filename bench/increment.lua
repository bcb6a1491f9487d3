-- wrk script for benchmark 6 (bench/increment.py): POST /increment with a JSON body made per
-- request, {"key": "key-N", "value": V}, N uniform in 1..keys, V uniform in -1000..1000.
--
--   wrk -t2 -c50 -d5s --latency -s bench/increment.lua http://127.0.0.1:8000/increment [-- KEYS|hot]
--
-- The argument after `--`: the number of distinct keys (default 10000), or "hot": every request
-- the same key. Each wrk thread seeds its own generator from its thread number and the clock, so
-- two threads never send the same sequence.

local KEYS = 10000
local HOT_KEY = "hot-key"
local MAX_VALUE = 1000

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

-- setup() runs once per thread in wrk's main Lua state, before the thread starts: it numbers them.
local threads = 0
function setup(thread)
   threads = threads + 1
   thread:set("thread_number", threads)
end

local keys = KEYS
local hot = false

-- init() runs inside each thread, whose globals setup() filled in.
function init(args)
   local mode = args[1]
   if mode == "hot" then
      hot = true
   elseif mode ~= nil then
      keys = tonumber(mode)
   end
   -- NOTE: os.time() has whole seconds only; the thread number keeps threads of one run apart.
   math.randomseed(os.time() * 1000 + (thread_number or 0) * 7919)
   math.random(); math.random()  -- the first draws after seeding are poorly mixed in some Luas
end

function request()
   local key = hot and HOT_KEY or ("key-" .. math.random(1, keys))
   local body = '{"key": "' .. key .. '", "value": ' .. math.random(-MAX_VALUE, MAX_VALUE) .. '}'
   return wrk.format(nil, nil, nil, body)
end
