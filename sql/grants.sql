-- Least privilege (loaded last, pgrx `finalize`).
--
-- polar_meter_sidecar: what polar-meterd logs in as (through a LOGIN role that
-- is a member). It can EXECUTE the functions it serves and nothing else: no
-- table access at all, so no key hashes and no direct writes.
-- polar_meter_admin: for DBAs who are not superusers: every function, and
-- read access to the tables.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'polar_meter_sidecar') THEN
        CREATE ROLE polar_meter_sidecar NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'polar_meter_admin') THEN
        CREATE ROLE polar_meter_admin NOLOGIN;
    END IF;
END
$$;

REVOKE ALL ON SCHEMA meter FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA meter FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA meter FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meter FROM PUBLIC;

GRANT USAGE ON SCHEMA meter TO polar_meter_sidecar, polar_meter_admin;

GRANT EXECUTE ON FUNCTION
    meter.record_event(text, text, text, text, jsonb),
    meter.record_event(text, text, text, timestamptz, jsonb),
    meter.verify_api_key(text, text),
    meter.create_own_api_key(text, text, text[], timestamptz),
    meter.list_own_api_keys(text),
    meter.revoke_own_api_key(text, uuid),
    meter.extension_version(),
    meter.drain_meter_outbox(int, interval, boolean),
    meter.take_meter_batch(uuid, interval),
    meter.delivery_sent(uuid, uuid[]),
    meter.delivery_deferred(uuid, uuid[], interval),
    meter.delivery_failed(uuid, uuid[], text),
    meter.delivery_rejected(uuid, uuid[], text),
    meter.claim_provisioning(int, interval),
    meter.customer_provisioned(text, text),
    meter.provisioning_failed(text, text),
    meter.backfill_polar_customers(),
    meter.reconcile_meter_to_polar(timestamptz, interval),
    meter.claim_reconcile_run(interval, bigint),
    meter.reconcile_add_remote(bigint, int, jsonb, interval),
    meter.reconcile_finish(bigint),
    meter.reconcile_failed(bigint, text),
    meter.seal_audit_log(int)
TO polar_meter_sidecar;

GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA meter TO polar_meter_admin;
GRANT SELECT ON ALL TABLES IN SCHEMA meter TO polar_meter_admin;

SELECT * FROM meter.install_schedules();
