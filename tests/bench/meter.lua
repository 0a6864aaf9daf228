-- wrk script: POST /api/v1/meter with a unique Idempotency-Key per request.
-- PM_KEY, PM_BODY, PM_RUN (and PM_DELAY_MS, a pause before each request that
-- turns wrk's closed loop into a paced one) come from tests/bench/*.sh.
-- PM_KEY may name several keys, comma-separated: requests take them in turn.
local keys = {}
for k in string.gmatch(os.getenv("PM_KEY"), "[^,]+") do
    keys[#keys + 1] = k
end
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
        ["Authorization"] = "Bearer " .. keys[counter % #keys + 1],
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
