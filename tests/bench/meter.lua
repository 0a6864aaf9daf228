-- wrk script: POST /api/v1/meter with a unique Idempotency-Key per request.
-- PM_KEY, PM_BODY, PM_RUN (and PM_DELAY_MS, a pause before each request that
-- turns wrk's closed loop into a paced one) come from tests/bench/*.sh.
-- PM_KEY may name several keys, comma-separated: requests take them in turn.
--
-- wrk, the sidecar and PostgreSQL share the machine's cores, so the client
-- must cost little: each key's request is formatted once (wrk.format) with a
-- marker where the Idempotency-Key goes, and a request is then one
-- concatenation of that template's halves around the key.
local keys = {}
for k in string.gmatch(os.getenv("PM_KEY"), "[^,]+") do
    keys[#keys + 1] = k
end
local body = os.getenv("PM_BODY")
local run = os.getenv("PM_RUN")
local pause = tonumber(os.getenv("PM_DELAY_MS") or "0")
local MARK = "\0IDEMPOTENCY-KEY\0"
local threads = 0
local counter = 0
local heads, tails = {}, {}

function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
end

-- Runs in each thread after setup, so tid is this thread's.
function init(args)
    for i, k in ipairs(keys) do
        local r = wrk.format("POST", "/api/v1/meter", {
            ["Authorization"] = "Bearer " .. k,
            ["Content-Type"] = "application/json",
            ["Idempotency-Key"] = MARK,
        }, body)
        local at = string.find(r, MARK, 1, true)
        heads[i] = string.sub(r, 1, at - 1) .. run .. "-" .. tid .. "-"
        tails[i] = string.sub(r, at + #MARK)
    end
end

function request()
    counter = counter + 1
    local i = counter % #keys + 1
    return heads[i] .. counter .. tails[i]
end

if pause > 0 then
    function delay()
        return pause
    end
end
