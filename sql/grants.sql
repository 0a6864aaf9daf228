-- Least privilege (loaded last, pgrx `finalize`; an upgrade script re-runs it).
--
-- polar_meter_sidecar: what polar-meterd logs in as (through a LOGIN role that
-- is a member). It can EXECUTE the functions it serves and nothing else: no
-- table access at all, so no key hashes and no direct writes, and no tunable.
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
-- Both roles lose everything first, so that a re-run (an upgrade) grants in
-- the same order as a fresh install: equal ACLs, not just equivalent ones.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meter FROM polar_meter_sidecar, polar_meter_admin;

GRANT USAGE ON SCHEMA meter TO polar_meter_sidecar, polar_meter_admin;

GRANT EXECUTE ON FUNCTION
    -- the HTTP API
    meter.record_events(text, jsonb),
    meter.verify_api_key(text, text),
    meter.create_own_api_key(text, text, text[], timestamptz),
    meter.list_own_api_keys(text),
    meter.revoke_own_api_key(text, uuid),
    meter.extension_version(),
    meter.oldest_supported_sidecar(),
    meter.outbox_stats(),
    -- delivery
    meter.due_organizations(int),
    meter.claim_delivery(text, int, interval),
    meter.delivery_sent(text, uuid, uuid[]),
    meter.delivery_deferred(text, uuid, uuid[], interval),
    meter.delivery_failed(text, uuid, uuid[], text),
    meter.delivery_unconfirmed(text, uuid, uuid[], text),
    meter.delivery_rejected(text, uuid, uuid[], text),
    meter.delivery_too_early(text, uuid, uuid[], text),
    meter.take_polar_slot(int),
    meter.pause_polar(interval),
    meter.polar_unavailable(text, jsonb),
    meter.polar_available(),
    -- customers
    meter.claim_provisioning(int, interval),
    meter.customer_provisioned(text, text),
    meter.customer_synced(text, int),
    meter.provisioning_failed(text, text),
    meter.backfill_polar_customers(),
    -- reconciliation
    meter.reconcile_meter_to_polar(timestamptz, interval, text),
    meter.claim_reconcile_run(interval, bigint),
    meter.reconcile_count_plan(bigint, interval),
    meter.reconcile_add_counts(bigint, jsonb, interval),
    meter.reconcile_list_plan(bigint, interval),
    meter.reconcile_add_listed(bigint, text, text, int, text[], text[], uuid[], text[], timestamptz[], interval),
    meter.reconcile_finish(bigint),
    meter.reconcile_failed(bigint, text),
    -- alerts
    meter.claim_alerts(int, interval),
    meter.alert_forwarded(text, bigint),
    meter.alert_forward_failed(text, bigint, text),
    -- deprecated since 0.4.0, for 0.3 sidecars during a rolling upgrade;
    -- removed in 0.5.0 (DEPRECATED in sidecar/src/store/mod.rs)
    meter.claim_events(text, int, interval),
    meter.reconcile_add_remote(bigint, text, text, int, jsonb, interval)
TO polar_meter_sidecar;

GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA meter TO polar_meter_admin;
GRANT SELECT ON ALL TABLES IN SCHEMA meter TO polar_meter_admin;

SELECT * FROM meter.install_schedules();
