-- The batch baseline: ten events and their ten audit rows per transaction,
-- as plain set-based INSERTs (what record_events writes for ten events).
\set n random(1, 2000000000)
BEGIN;
INSERT INTO meter.meter_event (organization_id, api_key_id, idempotency_key, event_name, event_timestamp,
    metadata, payload_hash, external_id)
SELECT 'acme', NULL, 'pgb10-' || :client_id || '-' || :n || '-' || i, 'api.request', now(),
    '{"tokens": 12, "model": "m"}', '\x00', 'pm_' || :n || '-' || i
FROM generate_series(1, 10) i
ON CONFLICT (organization_id, idempotency_key) DO NOTHING;
INSERT INTO meter.audit_log (organization_id, action, subject, created_at)
SELECT 'acme', 'event.recorded', :n || '-' || i, clock_timestamp() FROM generate_series(1, 10) i;
END;
