-- Scenario 1, the ceiling: GET /health.
package.path = package.path .. ";" .. (os.getenv("WRK_DIR") or ".") .. "/?.lua"
require "common"
wrk.method = "GET"
wrk.path = "/health"
