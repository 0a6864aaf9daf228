-- polar_meter 0.2.0 -> 0.3.0, part 1 of 3 (hand-written): the schema.
-- Part 2 is every function of 0.3.0 as CREATE OR REPLACE, generated from the
-- 0.3.0 install script; part 3 (after.sql) needs those functions.
-- scripts/upgrade-script.py joins them into sql/polar_meter--0.2.0--0.3.0.sql.

-- Functions whose signature, result or parameter names changed, or that are
-- gone: CREATE OR REPLACE cannot change them.
DROP FUNCTION meter.drain_meter_outbox(int, interval, boolean);
DROP FUNCTION meter.take_meter_batch(uuid, interval);
DROP FUNCTION meter.delivery_sent(uuid, uuid[]);
DROP FUNCTION meter.delivery_deferred(uuid, uuid[], interval);
DROP FUNCTION meter.delivery_failed(uuid, uuid[], text);
DROP FUNCTION meter.delivery_rejected(uuid, uuid[], text);
DROP FUNCTION meter.claim_provisioning(int, interval);
DROP FUNCTION meter.reconcile_meter_to_polar(timestamptz, interval);
DROP FUNCTION meter.claim_reconcile_run(interval, bigint);
DROP FUNCTION meter.reconcile_add_remote(bigint, int, jsonb, interval);
DROP FUNCTION meter.reconcile_failed(bigint, text);
DROP FUNCTION meter.verify_audit_chain();
DROP TYPE meter.audit_break;
DROP FUNCTION meter._alert(text, text, jsonb);
DROP FUNCTION meter._setting(text, text);
DROP FUNCTION meter._record_event(text, uuid, text, text, timestamptz, jsonb);
-- Rust helpers of 0.2 that 0.3's SQL no longer uses. The library keeps
-- their symbols (extension/src/compat.rs) for databases not yet upgraded.
DROP FUNCTION meter._event_violation(text, text, timestamptz, text, timestamptz, bigint);
DROP FUNCTION meter._timestamp_text_violation(text);
DROP FUNCTION meter._compute_drift(jsonb, jsonb);
DROP FUNCTION meter._payload_hash(text, timestamptz, text);
DROP FUNCTION meter._external_id(text, text);
-- New organizations are woken by upsert_organization, not by a trigger
-- (a trigger on a Citus reference table runs on every node, and NOTIFY there is refused).
DROP TRIGGER organization_provision ON meter.organization;
DROP FUNCTION meter._organization_inserted();
-- TRUNCATE now has its own refusal (PM042), on every table.
DROP TRIGGER audit_log_no_truncate ON meter.audit_log;
-- 0.2's row hash stays, for the frozen global chain.
ALTER FUNCTION meter._audit_digest(bytea, meter.audit_log) RENAME TO _audit_digest_legacy;

-- Tunables: a table only polar_meter_admin can write (they were GUCs any session could SET).
CREATE TABLE meter.setting_value (
    name       text PRIMARY KEY,
    value      text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by text NOT NULL DEFAULT session_user
);
COMMENT ON TABLE meter.setting_value IS
  'Tunables set with meter.set_setting(name, value); a missing row means the default (meter.settings() lists them).';

-- Organizations: an owner (Polar's rule: an email, or an owner with an
-- email), and versions so that name and email changes reach Polar.
ALTER TABLE meter.organization
    ADD COLUMN owner_email text,
    ADD COLUMN owner_name text,
    ADD COLUMN owner_external_id text,
    ADD COLUMN updated_at timestamptz,
    ADD COLUMN customer_version int NOT NULL DEFAULT 0,
    ADD COLUMN customer_synced int NOT NULL DEFAULT 0;
DROP INDEX meter.organization_unprovisioned;
CREATE INDEX organization_provision_due ON meter.organization (provision_next_at)
    WHERE polar_customer_id IS NULL OR customer_synced < customer_version;
COMMENT ON TABLE meter.organization IS
  'A customer of the platform; billed at Polar as a team customer with external_id = id. Managed with meter.upsert_organization.';

-- Keys: no NULL permission; last use kept per organization.
ALTER TABLE meter.api_key ADD CONSTRAINT api_key_permissions_check CHECK (array_position(permissions, NULL) IS NULL);
CREATE TABLE meter.api_key_usage (
    organization_id text NOT NULL,
    api_key_id      uuid NOT NULL,
    last_used_at    timestamptz NOT NULL,
    PRIMARY KEY (organization_id, api_key_id)
);
INSERT INTO meter.api_key_usage (organization_id, api_key_id, last_used_at)
SELECT k.organization_id, k.id, k.last_used_at FROM meter.api_key k WHERE k.last_used_at IS NOT NULL;
ALTER TABLE meter.api_key DROP COLUMN last_used_at;

-- Events: claims are per organization; dead letters have an index of their own.
DROP INDEX meter.meter_event_due;
CREATE INDEX meter_event_due ON meter.meter_event (organization_id, next_attempt_at)
    WHERE polar_status IN ('pending', 'failed', 'in_flight');
CREATE INDEX meter_event_dead ON meter.meter_event (organization_id) WHERE polar_status IN ('dropped', 'rejected');
-- Events of organizations without a customer now wait for it; none is lost
-- or changed here. Batches claimed by 0.2 come back when their leases end.

-- Audit: one chain per organization from now on. The global chain is
-- frozen where it ends: its head is kept as the legacy head, and rows
-- unsealed today join their organization's chain.
ALTER TABLE meter.audit_log ADD COLUMN seq bigint;
ALTER TABLE meter.audit_log ADD CONSTRAINT audit_log_organization_id_seq_key UNIQUE (organization_id, seq);
DROP INDEX meter.audit_log_unsealed;
CREATE INDEX audit_log_unsealed ON meter.audit_log (organization_id, id) WHERE row_hash IS NULL;
COMMENT ON TABLE meter.audit_log IS
  'Append-only; each organization''s rows are hash-chained by meter.seal_audit_log() and checked by meter.verify_audit_chain().';
INSERT INTO meter.audit_chain DEFAULT VALUES ON CONFLICT DO NOTHING;
ALTER TABLE meter.audit_chain RENAME TO audit_chain_legacy;
ALTER TABLE meter.audit_chain_legacy RENAME CONSTRAINT audit_chain_pkey TO audit_chain_legacy_pkey;
ALTER TABLE meter.audit_chain_legacy RENAME CONSTRAINT audit_chain_singleton_check TO audit_chain_legacy_singleton_check;
CREATE TABLE meter.audit_chain (
    organization_id text PRIMARY KEY,
    last_seq        bigint NOT NULL DEFAULT 0,
    last_hash       bytea NOT NULL DEFAULT '\x',
    sealed_at       timestamptz
);

-- The alert outbox.
CREATE SEQUENCE meter.alert_id_seq;
CREATE TABLE meter.alert (
    organization_id text NOT NULL,
    id              bigint NOT NULL DEFAULT nextval('meter.alert_id_seq'),
    kind            text NOT NULL,
    dedup_key       text NOT NULL,
    detail          jsonb NOT NULL DEFAULT '{}',
    raised_at       timestamptz NOT NULL DEFAULT now(),
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'forwarded', 'failed')),
    attempts        int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    forwarded_at    timestamptz,
    last_error      text,
    PRIMARY KEY (organization_id, id)
);
ALTER SEQUENCE meter.alert_id_seq OWNED BY meter.alert.id;
CREATE INDEX alert_due ON meter.alert (organization_id, next_attempt_at) WHERE status = 'pending';
COMMENT ON TABLE meter.alert IS
  'Every alert raised, and its forwarding to ALERT_WEBHOOK_URL (pending, forwarded, failed).';

-- Reconciliation: counts first, bounded retries, per-organization copies.
ALTER TABLE meter.reconcile_run
    ADD COLUMN mode text NOT NULL DEFAULT 'full' CHECK (mode IN ('counts', 'full')),
    ADD COLUMN attempts int NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_error text,
    ADD COLUMN remote_total bigint;
-- The copy of Polar's events is transient: unfinished runs list again.
DELETE FROM meter.reconcile_remote;
UPDATE meter.reconcile_run SET pages_done = 0 WHERE status IN ('requested', 'running');
ALTER TABLE meter.reconcile_remote
    DROP CONSTRAINT reconcile_remote_run_id_fkey,
    DROP CONSTRAINT reconcile_remote_pkey,
    DROP COLUMN external_customer_id,
    ADD COLUMN organization_id text NOT NULL,
    ADD CONSTRAINT reconcile_remote_pkey PRIMARY KEY (organization_id, run_id, polar_event_id);
DROP INDEX meter.reconcile_remote_event;
CREATE INDEX reconcile_remote_event ON meter.reconcile_remote (organization_id, run_id, meter_event_id);
CREATE TABLE meter.reconcile_count (
    organization_id text NOT NULL,
    run_id          bigint NOT NULL,
    event_name      text NOT NULL,
    local_sent      bigint NOT NULL,
    remote          bigint,
    listed          boolean NOT NULL DEFAULT false,
    pages_done      int NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, run_id, event_name)
);
-- Every event a run found missing at Polar or unexpected there, kept with
-- the run (its result names only the first 100 of each).
CREATE TABLE meter.reconcile_finding (
    organization_id text NOT NULL,
    run_id          bigint NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('missing_at_polar', 'unexpected_at_polar')),
    event_id        text NOT NULL,           -- our event id (missing), Polar's (unexpected)
    event_name      text NOT NULL,
    event_timestamp timestamptz NOT NULL,
    PRIMARY KEY (organization_id, run_id, kind, event_id)
);
COMMENT ON TABLE meter.reconcile_finding IS
  'Every event a reconcile run found missing at Polar (event_id is ours: resend with meter.resend_events) or unexpected there (event_id is Polar''s).';
CREATE TABLE meter.reconcile_dirty (
    organization_id text NOT NULL,
    day             date NOT NULL,
    marked_at       timestamptz NOT NULL,
    PRIMARY KEY (organization_id, day)
);

-- One rate budget towards Polar for every sidecar.
CREATE TABLE meter.polar_budget (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    next_slot    timestamptz NOT NULL DEFAULT '-infinity',
    paused_until timestamptz NOT NULL DEFAULT '-infinity'
);

SELECT pg_catalog.pg_extension_config_dump('meter.setting_value', '');
SELECT pg_catalog.pg_extension_config_dump('meter.api_key_usage', '');
SELECT pg_catalog.pg_extension_config_dump('meter.audit_chain', '');
SELECT pg_catalog.pg_extension_config_dump('meter.alert', '');
SELECT pg_catalog.pg_extension_config_dump('meter.alert_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('meter.reconcile_count', '');
SELECT pg_catalog.pg_extension_config_dump('meter.reconcile_dirty', '');
SELECT pg_catalog.pg_extension_config_dump('meter.polar_budget', '');
SELECT pg_catalog.pg_extension_config_dump('meter.reconcile_finding', '');

CREATE TYPE meter.batch_recording AS (idx int, status text, event_id uuid, sqlstate text, message text);
COMMENT ON TYPE meter.batch_recording IS
  'One item of record_events: its index in the batch (from 0), and recorded or already_recorded with the event id, or error with its SQLSTATE and message.';
CREATE TYPE meter.audit_break AS (organization_id text, id bigint, problem text);
COMMENT ON TYPE meter.audit_break IS 'The first broken link of an audit chain: its organization, the row id and what is wrong.';

-- The guards of schema.sql, and the triggers that use them.
CREATE OR REPLACE FUNCTION meter._refuse_delete() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'PM041',
        MESSAGE = format('rows of %I.%I cannot be deleted: billing records refer to them', TG_TABLE_SCHEMA, TG_TABLE_NAME);
END
$$;
COMMENT ON FUNCTION meter._refuse_delete() IS 'Internal trigger: refuses DELETE on tables that billing records refer to (PM041).';

CREATE FUNCTION meter._refuse_truncate() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'PM042',
        MESSAGE = format('%I.%I cannot be truncated: it holds billing records or their state', TG_TABLE_SCHEMA, TG_TABLE_NAME);
END
$$;
COMMENT ON FUNCTION meter._refuse_truncate() IS 'Internal trigger: refuses TRUNCATE on every polar_meter table (PM042).';

CREATE OR REPLACE FUNCTION meter._audit_append_only() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- The one update allowed: the sealer filling in the chain of an unsealed row.
    IF TG_OP = 'UPDATE' AND OLD.row_hash IS NULL AND NEW.row_hash IS NOT NULL AND OLD.seq IS NULL
       AND (NEW.organization_id, NEW.id, NEW.action, NEW.subject, NEW.detail, NEW.actor, NEW.created_at)
           IS NOT DISTINCT FROM
           (OLD.organization_id, OLD.id, OLD.action, OLD.subject, OLD.detail, OLD.actor, OLD.created_at)
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'PM040',
        MESSAGE = format('meter.audit_log is append-only: %s refused', TG_OP);
END
$$;
COMMENT ON FUNCTION meter._audit_append_only() IS
  'Internal trigger: refuses UPDATE and DELETE on meter.audit_log (PM040), except sealing an unsealed row.';

CREATE TRIGGER alert_no_delete BEFORE DELETE ON meter.alert
    FOR EACH ROW EXECUTE FUNCTION meter._refuse_delete();
CREATE TRIGGER setting_value_no_truncate BEFORE TRUNCATE ON meter.setting_value
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER organization_no_truncate BEFORE TRUNCATE ON meter.organization
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER api_key_no_truncate BEFORE TRUNCATE ON meter.api_key
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER api_key_usage_no_truncate BEFORE TRUNCATE ON meter.api_key_usage
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER meter_event_no_truncate BEFORE TRUNCATE ON meter.meter_event
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON meter.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER audit_chain_no_truncate BEFORE TRUNCATE ON meter.audit_chain
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER audit_chain_legacy_no_truncate BEFORE TRUNCATE ON meter.audit_chain_legacy
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER alert_state_no_truncate BEFORE TRUNCATE ON meter.alert_state
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER alert_no_truncate BEFORE TRUNCATE ON meter.alert
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER reconcile_run_no_truncate BEFORE TRUNCATE ON meter.reconcile_run
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER reconcile_count_no_truncate BEFORE TRUNCATE ON meter.reconcile_count
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER reconcile_remote_no_truncate BEFORE TRUNCATE ON meter.reconcile_remote
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER reconcile_dirty_no_truncate BEFORE TRUNCATE ON meter.reconcile_dirty
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER polar_budget_no_truncate BEFORE TRUNCATE ON meter.polar_budget
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
CREATE TRIGGER reconcile_finding_no_truncate BEFORE TRUNCATE ON meter.reconcile_finding
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_truncate();
