-- POST /book on one event (EVENT_ID), a new user id per request.
package.path = package.path .. ";" .. (os.getenv("WRK_DIR") or ".") .. "/?.lua"
require "common"
local event = tonumber(os.getenv("EVENT_ID") or "1")
local headers = { ["Content-Type"] = "application/json" }

request = function()
  counter = counter + 1
  return wrk.format("POST", "/book", headers,
    string.format('{"user_id": %d, "event_id": %d}', counter, event))
end
