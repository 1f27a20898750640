-- POST /book on one event (EVENT_ID) as a careful client would: a new user id and a fresh
-- Idempotency-Key per request (the event has a per-customer limit).
package.path = package.path .. ";" .. (os.getenv("WRK_DIR") or ".") .. "/?.lua"
require "common"
local event = tonumber(os.getenv("EVENT_ID") or "1")

request = function()
  counter = counter + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = string.format("checkout-%d", counter),
  }
  return wrk.format("POST", "/book", headers,
    string.format('{"user_id": %d, "event_id": %d, "quantity": 2}', counter, event))
end
