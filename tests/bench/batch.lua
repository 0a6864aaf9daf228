-- wrk script: POST /api/v1/meter/batch, PM_SIZE events per request, every
-- idempotency_key unique. PM_KEY, PM_TS, PM_RUN, PM_SIZE come from batch.sh.
local key = os.getenv("PM_KEY")
local ts = os.getenv("PM_TS")
local run = os.getenv("PM_RUN")
local size = tonumber(os.getenv("PM_SIZE"))
local threads = 0
local counter = 0

function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
end

function request()
    counter = counter + 1
    local prefix = run .. "-" .. tid .. "-" .. counter .. "-"
    local items = {}
    for i = 1, size do
        items[i] = '{"idempotency_key":"' .. prefix .. i .. '","event_name":"api.request","event_timestamp":"'
            .. ts .. '","metadata":{"tokens":12,"model":"m"}}'
    end
    local headers = {
        ["Authorization"] = "Bearer " .. key,
        ["Content-Type"] = "application/json",
    }
    return wrk.format("POST", "/api/v1/meter/batch", headers, '{"events":[' .. table.concat(items, ",") .. "]}")
end
