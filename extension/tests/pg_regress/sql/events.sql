-- Recording: one batch call, each item judged alone; replays and conflicts.
\i common/setup.sql
SELECT (meter.upsert_organization('acme', 'Acme', 'billing@acme.test')).id;
CREATE TEMP TABLE k AS SELECT * FROM meter.create_api_key('acme', 'fence', '{fence:meter}');

CREATE TEMP TABLE first AS
SELECT r.* FROM k, meter.record_events(k.key, jsonb_build_array(
    jsonb_build_object('idempotency_key', 'a', 'event_name', 'api.call',
                       'event_timestamp', '2026-01-31T12:00:00Z', 'metadata', jsonb_build_object('tokens', 12)),
    jsonb_build_object('idempotency_key', 'b', 'event_name', 'api.call', 'event_timestamp', '2026-01-31T12:00:01Z'),
    jsonb_build_object('idempotency_key', 'c', 'event_name', '', 'event_timestamp', '2026-01-31T12:00:02Z'),
    jsonb_build_object('idempotency_key', 'd', 'event_name', 'x', 'event_timestamp', 'yesterday'),
    jsonb_build_object('idempotency_key', 'e', 'event_name', 'x', 'event_timestamp', '2026-01-31T12:00:00Z',
                       'metadata', jsonb_build_object('nested', jsonb_build_object('no', 1))),
    jsonb_build_object('idempotency_key', 'f', 'event_name', 'x', 'event_timestamp', '2026-01-31T12:00:00Z',
                       'colour', 'red'),
    jsonb_build_object('event_name', 'x', 'event_timestamp', '2026-01-31T12:00:00Z'),
    jsonb_build_object('idempotency_key', 'a', 'event_name', 'api.call',
                       'event_timestamp', '2026-01-31T12:00:00Z', 'metadata', jsonb_build_object('tokens', 12)),
    '"not an object"'::jsonb)) r;
SELECT idx, status, event_id IS NOT NULL AS has_id, sqlstate, message FROM first ORDER BY idx;
-- The repeat of 'a' in the same call is the same event.
SELECT count(DISTINCT event_id) AS distinct_ids FROM first WHERE idx IN (0, 7);

-- A replay answers the same id; the same key with another payload is refused.
SELECT r.status, r.event_id = f.event_id AS same_id
FROM k, first f, meter.record_events(k.key, '[{"idempotency_key": "a", "event_name": "api.call",
    "event_timestamp": "2026-01-31T12:00:00Z", "metadata": {"tokens": 12}}]') r WHERE f.idx = 0;
SELECT r.status, r.sqlstate, regexp_replace(r.message, '[0-9a-f-]{36}', '<uuid>') AS message
FROM k, meter.record_events(k.key, '[{"idempotency_key": "a",
    "event_name": "api.call", "event_timestamp": "2026-01-31T12:00:00Z", "metadata": {"tokens": 13}}]') r;

-- The envelope is the call's: it fails whole.
SELECT pg_temp.try(format($$SELECT meter.record_events(%L, '[]')$$, key)) AS empty FROM k;
SELECT pg_temp.try(format($$SELECT meter.record_events(%L, '{}')$$, key)) AS not_an_array FROM k;
SELECT pg_temp.try($$SELECT meter.record_events('ak_nope', '[{}]')$$) AS bad_key;

-- What was stored, and the audit row each new event got.
SELECT idempotency_key, event_name, event_timestamp AT TIME ZONE 'UTC' AS at_utc, metadata, polar_status, attempts
FROM meter.meter_event ORDER BY idempotency_key;
SELECT action, count(*) FROM meter.audit_log WHERE action LIKE 'event.%' GROUP BY action ORDER BY action;
