-- POST /book once on each event from EVENT_MIN to EVENT_MAX, the threads taking turns, then
-- keeps cycling: used to wake one actor per event (the memory scenario).
package.path = package.path .. ";" .. (os.getenv("WRK_DIR") or ".") .. "/?.lua"
require "common"
local lo = tonumber(os.getenv("EVENT_MIN") or "1")
local hi = tonumber(os.getenv("EVENT_MAX") or "100000")
local nthreads = tonumber(os.getenv("WRK_THREADS") or "2")
local headers = { ["Content-Type"] = "application/json" }
local i = -1

request = function()
  i = i + 1
  counter = counter + 1
  local event = lo + ((tid + i * nthreads) % (hi - lo + 1))
  return wrk.format("POST", "/book", headers,
    string.format('{"user_id": %d, "event_id": %d}', counter, event))
end
