-- wrk script for the mixed run of benchmark 4 (bench/load.py): GET / and POST /increment in
-- turn from each wrk thread (half the requests each; a thread's connections share its turns), the increment with a JSON body made per request ({"key": "key-N",
-- "value": V}, N uniform in 1..10000, V uniform in -1000..1000): the points service and the
-- counters service under load at once, as one daemon serves them.
--
--   wrk -t2 -c50 -d1s --latency -s bench/mixed.lua http://127.0.0.1:8000/

local KEYS = 10000
local MAX_VALUE = 1000

-- setup() runs once per thread in wrk's main Lua state, before the thread starts: it numbers them.
local threads = 0
function setup(thread)
   threads = threads + 1
   thread:set("thread_number", threads)
end

local sent = 0
local headers = {["Content-Type"] = "application/json"}

function init(args)
   -- NOTE: os.time() has whole seconds only; the thread number keeps threads of one run apart.
   math.randomseed(os.time() * 1000 + (thread_number or 0) * 7919)
   math.random(); math.random()  -- the first draws after seeding are poorly mixed in some Luas
end

function request()
   sent = sent + 1
   if sent % 2 == 0 then
      return wrk.format("GET", "/")
   end
   local body = '{"key": "key-' .. math.random(1, KEYS) .. '", "value": ' .. math.random(-MAX_VALUE, MAX_VALUE) .. '}'
   return wrk.format("POST", "/increment", headers, body)
end
