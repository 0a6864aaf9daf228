-- polar_meter schema: tables, types, the triggers that guard the tables, and
-- pg_dump registration. Loaded first (pgrx `bootstrap`); the functions come
-- after, in the order extension/src/lib.rs declares, and sql/grants.sql last.
--
-- Citus fit (README, "Scaling out"): every primary or unique key of a
-- per-organization table (meter_event, audit_log, alert, api_key_usage,
-- reconcile_*) starts with organization_id, the distribution column; the
-- small tables (setting, organization, api_key) can be reference tables; no
-- hot-path statement touches two organizations. Columns added after 0.1 are
-- appended, so a fresh install and an upgraded one have the same row types.

-- Tunables: a row overrides the default declared in Rust (meter._setting).
-- Written only through meter.set_setting (polar_meter_admin), never by SET:
-- some are security-relevant (max_future_skew bounds what a client may bill).
CREATE TABLE meter.setting_value (
    name       text PRIMARY KEY,
    value      text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by text NOT NULL DEFAULT session_user
);
COMMENT ON TABLE meter.setting_value IS
  'Tunables set with meter.set_setting(name, value); a missing row means the default (meter.settings() lists them).';

CREATE TABLE meter.organization (
    id                 text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
    name               text NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    email              text,
    polar_customer_id  text UNIQUE,
    created_at         timestamptz NOT NULL DEFAULT now(),
    -- Provisioning of the Polar customer (organizations.sql): due while
    -- there is no customer, or while Polar has an older version of the row.
    provision_attempts int NOT NULL DEFAULT 0,
    provision_next_at  timestamptz NOT NULL DEFAULT now(),
    provision_error    text,
    owner_email        text,
    owner_name         text,
    owner_external_id  text,
    updated_at         timestamptz,
    customer_version   int NOT NULL DEFAULT 0,   -- bumped by each change Polar must hear of
    customer_synced    int NOT NULL DEFAULT 0    -- the version Polar holds
);
CREATE INDEX organization_provision_due ON meter.organization (provision_next_at)
    WHERE polar_customer_id IS NULL OR customer_synced < customer_version;
COMMENT ON TABLE meter.organization IS
  'A customer of the platform; billed at Polar as a team customer with external_id = id. Managed with meter.upsert_organization.';

CREATE TABLE meter.api_key (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id text NOT NULL REFERENCES meter.organization (id),
    name            text NOT NULL,
    start           text NOT NULL,
    key_hash        bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    -- No NULL inside: `p = ANY (perms)` is NULL, not false, when one is there.
    permissions     text[] NOT NULL DEFAULT '{fence:meter}' CHECK (array_position(permissions, NULL) IS NULL),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    revoked_at      timestamptz,
    -- The keys:manage key that made this one (NULL: a root, made in SQL);
    -- revoking a key revokes what it minted, transitively.
    minted_by       uuid,
    -- Set when the key is rotated: a key is rotated once.
    replaced_by     uuid
);
CREATE INDEX api_key_organization ON meter.api_key (organization_id);
CREATE INDEX api_key_minted_by ON meter.api_key (minted_by) WHERE minted_by IS NOT NULL;
COMMENT ON TABLE meter.api_key IS
  'Opaque bearer keys (ak_ + 48 base62). Only the SHA-256 is kept; the key is shown once, at creation.';

-- When each key was last used, at most one write a minute per key. Kept apart
-- from api_key so that the hot path writes only per-organization rows (api_key
-- is a reference table under Citus, and writing it means every node).
CREATE TABLE meter.api_key_usage (
    organization_id text NOT NULL,
    api_key_id      uuid NOT NULL,
    last_used_at    timestamptz NOT NULL,
    PRIMARY KEY (organization_id, api_key_id)
);

CREATE TABLE meter.meter_event (
    organization_id   text NOT NULL,
    id                uuid NOT NULL DEFAULT gen_random_uuid(),
    api_key_id        uuid,
    idempotency_key   text NOT NULL,
    event_name        text NOT NULL,
    event_timestamp   timestamptz NOT NULL,
    metadata          jsonb NOT NULL DEFAULT '{}',
    payload_hash      bytea NOT NULL,
    external_id       text NOT NULL,
    polar_customer_id text,
    polar_status      text NOT NULL DEFAULT 'pending'
        CHECK (polar_status IN ('pending', 'in_flight', 'sent', 'failed', 'dropped', 'rejected')),
    attempts          int NOT NULL DEFAULT 0,
    last_attempt_at   timestamptz,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    lease_expires_at  timestamptz,
    batch_id          uuid,          -- the claim holding an in_flight row
    last_error        text,
    polar_event_id    text,
    sent_at           timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    -- Per org, never global: a global key would let one org's client swallow
    -- another org's event.
    UNIQUE (organization_id, idempotency_key)
);
-- No foreign keys here on purpose: every insert would share-lock the same hot
-- organization and key rows (multixacts under load). Recording checks both,
-- and organizations and keys can never be deleted (triggers below).
CREATE INDEX meter_event_window ON meter.meter_event (event_timestamp);
-- Claims are per organization (outbox.sql): due rows of one org, oldest first.
CREATE INDEX meter_event_due ON meter.meter_event (organization_id, next_attempt_at)
    WHERE polar_status IN ('pending', 'failed', 'in_flight');
-- Dead letters, counted by outbox_stats without reading the table.
CREATE INDEX meter_event_dead ON meter.meter_event (organization_id) WHERE polar_status IN ('dropped', 'rejected');
COMMENT ON TABLE meter.meter_event IS
  'Every accepted usage event, and its delivery state towards Polar (the outbox).';

CREATE SEQUENCE meter.audit_log_id_seq;
CREATE TABLE meter.audit_log (
    organization_id text NOT NULL,          -- '' for rows not tied to one org
    id              bigint NOT NULL DEFAULT nextval('meter.audit_log_id_seq'),
    action          text NOT NULL,
    subject         text,
    detail          jsonb NOT NULL DEFAULT '{}',
    actor           text NOT NULL DEFAULT session_user,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    prev_hash       bytea,
    row_hash        bytea,
    -- Position in the organization's chain, given by the sealer (audit.sql);
    -- NULL while unsealed, and on rows sealed into 0.2's global chain.
    seq             bigint,
    PRIMARY KEY (organization_id, id),
    UNIQUE (organization_id, seq)
);
ALTER SEQUENCE meter.audit_log_id_seq OWNED BY meter.audit_log.id;
CREATE INDEX audit_log_unsealed ON meter.audit_log (organization_id, id) WHERE row_hash IS NULL;
COMMENT ON TABLE meter.audit_log IS
  'Append-only; each organization''s rows are hash-chained by meter.seal_audit_log() and checked by meter.verify_audit_chain().';

-- The sealed end of each organization's chain. Created by its first seal
-- (not here, so that a pg_dump restore brings rows back without conflicts);
-- its sealer locks it, while recording never touches it.
CREATE TABLE meter.audit_chain (
    organization_id text PRIMARY KEY,
    last_seq        bigint NOT NULL DEFAULT 0,
    last_hash       bytea NOT NULL DEFAULT '\x',
    sealed_at       timestamptz
);

-- polar_meter 0.1 and 0.2 chained every row in one global chain. Rows are
-- append-only and cannot be rehashed, so the upgrade to 0.3 froze that chain
-- here (its last id and hash) and verify_audit_chain checks it as it was.
-- Empty on a database that started at 0.3.
CREATE TABLE meter.audit_chain_legacy (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id   bigint NOT NULL DEFAULT 0,
    last_hash bytea NOT NULL DEFAULT '\x'
);

-- When each standing alert condition last fired, so it repeats once per
-- alert_repeat_after, not on every cron tick.
CREATE TABLE meter.alert_state (
    kind            text NOT NULL,
    organization_id text NOT NULL DEFAULT '',
    last_at         timestamptz NOT NULL,
    PRIMARY KEY (kind, organization_id)
);

-- The alert outbox (alerts.sql): an alert is a row first; sidecars claim it
-- under a lease and forward it to ALERT_WEBHOOK_URL, so none is lost while no
-- sidecar runs, and each is forwarded by one sidecar.
CREATE SEQUENCE meter.alert_id_seq;
CREATE TABLE meter.alert (
    organization_id text NOT NULL,          -- '' for alerts not tied to one org
    id              bigint NOT NULL DEFAULT nextval('meter.alert_id_seq'),
    kind            text NOT NULL,
    dedup_key       text NOT NULL,          -- equal for repeats of one condition
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
-- The sidecar's alerts are limited per kind and organization an hour.
CREATE INDEX alert_recent ON meter.alert (organization_id, kind, raised_at);
COMMENT ON TABLE meter.alert IS
  'Every alert raised, and its forwarding to ALERT_WEBHOOK_URL (pending, forwarded, failed).';

CREATE SEQUENCE meter.reconcile_run_id_seq;
CREATE TABLE meter.reconcile_run (
    id              bigint PRIMARY KEY DEFAULT nextval('meter.reconcile_run_id_seq'),
    window_start    timestamptz NOT NULL,
    window_end      timestamptz NOT NULL CHECK (window_end > window_start),
    status          text NOT NULL DEFAULT 'requested'
        CHECK (status IN ('requested', 'running', 'done', 'failed')),
    requested_by    text NOT NULL DEFAULT session_user,
    created_at      timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    pages_done      int NOT NULL DEFAULT 0,   -- pages of a full listing handed back: a resumed run starts after them
    finished_at     timestamptz,
    drift           bigint,
    drift_ratio     double precision,
    result          jsonb,
    -- counts: compare per (customer, event name) counts, list only where
    -- they differ; full: list every event of the window.
    mode            text NOT NULL DEFAULT 'full' CHECK (mode IN ('counts', 'full')),
    attempts        int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    remote_total    bigint                    -- Polar's count for the whole window
);
ALTER SEQUENCE meter.reconcile_run_id_seq OWNED BY meter.reconcile_run.id;
COMMENT ON TABLE meter.reconcile_run IS 'One reconciliation of a time window against Polar, and its result.';

-- Local and Polar counts per (customer, event name) of a run.
CREATE TABLE meter.reconcile_count (
    organization_id text NOT NULL,
    run_id          bigint NOT NULL,
    event_name      text NOT NULL,
    local_sent      bigint NOT NULL,
    remote          bigint,                  -- Polar's total_count; NULL until counted
    listed          boolean NOT NULL DEFAULT false,
    pages_done      int NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, run_id, event_name)
);

-- What Polar listed for a run, one row per Polar event, handed back a page
-- at a time; deleted when the run finishes (its result keeps what matters).
CREATE TABLE meter.reconcile_remote (
    run_id          bigint NOT NULL,
    polar_event_id  text NOT NULL,
    meter_event_id  uuid,                    -- from metadata; NULL for events we never sent
    event_name      text NOT NULL,
    event_timestamp timestamptz NOT NULL,
    organization_id text NOT NULL,           -- the event's external_customer_id ('' without one)
    PRIMARY KEY (organization_id, run_id, polar_event_id)
);
CREATE INDEX reconcile_remote_event ON meter.reconcile_remote (organization_id, run_id, meter_event_id);

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

-- Days that gained sent events after they might have been reconciled: the
-- daily job re-opens the windows that cover them (reconcile.sql).
CREATE TABLE meter.reconcile_dirty (
    organization_id text NOT NULL,
    day             date NOT NULL,
    marked_at       timestamptz NOT NULL,
    PRIMARY KEY (organization_id, day)
);

-- One rate budget towards Polar for every sidecar of this database: calls
-- are spaced by reserving slots here (outbox.sql, take_polar_slot).
CREATE TABLE meter.polar_budget (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    next_slot    timestamptz NOT NULL DEFAULT '-infinity',
    paused_until timestamptz NOT NULL DEFAULT '-infinity'
);

-- Results of the hot-path functions. Composite (not SETOF) returns make a call
-- a plain expression: no set-returning machinery per recorded event.
CREATE TYPE meter.key_identity AS (organization_id text, api_key_id uuid);
COMMENT ON TYPE meter.key_identity IS 'What a verified API key stands for: its organization and its id.';
CREATE TYPE meter.recording AS (status text, event_id uuid);
COMMENT ON TYPE meter.recording IS 'The outcome of record_event: status recorded or already_recorded, and the event id.';
CREATE TYPE meter.batch_recording AS (idx int, status text, event_id uuid, sqlstate text, message text);
COMMENT ON TYPE meter.batch_recording IS
  'One item of record_events: its index in the batch (from 0), and recorded or already_recorded with the event id, or error with its SQLSTATE and message.';
CREATE TYPE meter.audit_break AS (organization_id text, id bigint, problem text);
COMMENT ON TYPE meter.audit_break IS 'The first broken link of an audit chain: its organization, the row id and what is wrong.';

-- Guards. Organizations, keys, events and alerts are referred to by billing
-- records: they are revoked or superseded, never deleted. No table is
-- truncated. The audit log is append-only.
CREATE FUNCTION meter._refuse_delete() RETURNS trigger
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

CREATE FUNCTION meter._audit_append_only() RETURNS trigger
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

CREATE TRIGGER organization_no_delete BEFORE DELETE ON meter.organization
    FOR EACH ROW EXECUTE FUNCTION meter._refuse_delete();
CREATE TRIGGER api_key_no_delete BEFORE DELETE ON meter.api_key
    FOR EACH ROW EXECUTE FUNCTION meter._refuse_delete();
CREATE TRIGGER meter_event_no_delete BEFORE DELETE ON meter.meter_event
    FOR EACH ROW EXECUTE FUNCTION meter._refuse_delete();
CREATE TRIGGER alert_no_delete BEFORE DELETE ON meter.alert
    FOR EACH ROW EXECUTE FUNCTION meter._refuse_delete();
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON meter.audit_log
    FOR EACH ROW EXECUTE FUNCTION meter._audit_append_only();

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

-- Without this pg_dump leaves extension-owned rows out: lost billing records.
SELECT pg_catalog.pg_extension_config_dump('meter.setting_value', '');
SELECT pg_catalog.pg_extension_config_dump('meter.organization', '');
SELECT pg_catalog.pg_extension_config_dump('meter.api_key', '');
SELECT pg_catalog.pg_extension_config_dump('meter.api_key_usage', '');
SELECT pg_catalog.pg_extension_config_dump('meter.meter_event', '');
SELECT pg_catalog.pg_extension_config_dump('meter.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('meter.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('meter.audit_chain', '');
SELECT pg_catalog.pg_extension_config_dump('meter.audit_chain_legacy', '');
SELECT pg_catalog.pg_extension_config_dump('meter.alert_state', '');
SELECT pg_catalog.pg_extension_config_dump('meter.alert', '');
SELECT pg_catalog.pg_extension_config_dump('meter.alert_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('meter.reconcile_run', '');
SELECT pg_catalog.pg_extension_config_dump('meter.reconcile_run_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('meter.reconcile_count', '');
SELECT pg_catalog.pg_extension_config_dump('meter.reconcile_remote', '');
SELECT pg_catalog.pg_extension_config_dump('meter.reconcile_dirty', '');
SELECT pg_catalog.pg_extension_config_dump('meter.polar_budget', '');
SELECT pg_catalog.pg_extension_config_dump('meter.reconcile_finding', '');
