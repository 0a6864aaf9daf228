-- polar_meter 0.3.0 -> 0.4.0, part 1 of 3 (hand-written): the schema.
-- Part 2 is every function of 0.4.0 as CREATE OR REPLACE, generated from the
-- 0.4.0 install script; part 3 (after.sql) needs those functions.
-- scripts/upgrade-script.py joins them into sql/polar_meter--0.3.0--0.4.0.sql.
-- The script is open while 0.4.0 is unreleased: each 0.4 change adds to it.

-- Keys remember who minted them and whether they were rotated. Keys of 0.3
-- have no minter: they stay roots.
ALTER TABLE meter.api_key ADD COLUMN minted_by uuid, ADD COLUMN replaced_by uuid;
CREATE INDEX api_key_minted_by ON meter.api_key (minted_by) WHERE minted_by IS NOT NULL;
-- A key rotated under 0.3 is known by the audit row of its rotation.
-- (One key at a time: Citus cannot update a reference table from a join
-- with a distributed one.)
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT a.subject, a.detail->>'new_id' AS new_id FROM meter.audit_log a
             WHERE a.action = 'api_key.rotated' AND a.detail ? 'new_id' LOOP
        UPDATE meter.api_key k SET replaced_by = r.new_id::uuid WHERE k.id = r.subject::uuid;
    END LOOP;
END
$$;

-- The sidecar's alerts are limited per kind and organization an hour.
CREATE INDEX alert_recent ON meter.alert (organization_id, kind, raised_at);

-- Polar's event body is built by the sidecar now (claim_delivery returns
-- events as stored); 0.3's claim_events builds it inline until 0.5.0.
DROP FUNCTION meter._event_payload(meter.meter_event);
