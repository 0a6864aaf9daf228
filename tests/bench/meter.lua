-- wrk script: POST /api/v1/meter with a unique Idempotency-Key per request.
-- PM_KEY, PM_BODY and PM_RUN come from tests/bench/ingest.sh.
local key = os.getenv("PM_KEY")
local body = os.getenv("PM_BODY")
local run = os.getenv("PM_RUN")
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
