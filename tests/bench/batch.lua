-- wrk script: POST /api/v1/meter/batch, PM_SIZE events per request, every
-- idempotency_key unique. PM_KEY, PM_TS, PM_RUN, PM_SIZE come from batch.sh.
-- PM_KEY may name several keys, comma-separated: requests take them in turn.
local keys = {}
for k in string.gmatch(os.getenv("PM_KEY"), "[^,]+") do
    keys[#keys + 1] = k
end
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
        ["Authorization"] = "Bearer " .. keys[counter % #keys + 1],
        ["Content-Type"] = "application/json",
    }
    return wrk.format("POST", "/api/v1/meter/batch", headers, '{"events":[' .. table.concat(items, ",") .. "]}")
end
