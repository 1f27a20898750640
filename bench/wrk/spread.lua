-- POST /book on events chosen at random between EVENT_MIN and EVENT_MAX.
package.path = package.path .. ";" .. (os.getenv("WRK_DIR") or ".") .. "/?.lua"
require "common"
local lo = tonumber(os.getenv("EVENT_MIN") or "1")
local hi = tonumber(os.getenv("EVENT_MAX") or "10000")
local headers = { ["Content-Type"] = "application/json" }

request = function()
  counter = counter + 1
  return wrk.format("POST", "/book", headers,
    string.format('{"user_id": %d, "event_id": %d}', counter, math.random(lo, hi)))
end
