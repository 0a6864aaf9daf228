-- The baseline: the rows record_event writes (a meter_event row with ON
-- CONFLICT on the idempotency key, and an audit row), as plain INSERTs.
\set n random(1, 2000000000)
BEGIN;
INSERT INTO meter.meter_event (organization_id, api_key_id, idempotency_key, event_name, event_timestamp,
    metadata, payload_hash, external_id)
VALUES ('acme', NULL, 'pgb-' || :client_id || '-' || :n, 'api.request', now(),
    '{"tokens": 12, "model": "m"}', '\x00', 'pm_' || :n)
ON CONFLICT (organization_id, idempotency_key) DO NOTHING;
INSERT INTO meter.audit_log (organization_id, action, subject, created_at) VALUES ('acme', 'event.recorded', :n, clock_timestamp());
END;
