-- wrk script: POST /api/v1/meter with a unique Idempotency-Key per request.
-- PM_KEY, PM_BODY, PM_RUN (and PM_DELAY_MS, a pause before each request that
-- turns wrk's closed loop into a paced one) come from tests/bench/*.sh.
local key = os.getenv("PM_KEY")
local body = os.getenv("PM_BODY")
local run = os.getenv("PM_RUN")
local pause = tonumber(os.getenv("PM_DELAY_MS") or "0")
local threads = 0
local counter = 0

function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
end

function request()
    counter = counter + 1
    local headers = {
        ["Authorization"] = "Bearer " .. key,
        ["Content-Type"] = "application/json",
        ["Idempotency-Key"] = run .. "-" .. tid .. "-" .. counter,
    }
    return wrk.format("POST", "/api/v1/meter", headers, body)
end

if pause > 0 then
    function delay()
        return pause
    end
end
