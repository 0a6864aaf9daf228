-- polar_meter schema: tables, indexes and pg_dump registration.
-- Loaded first (pgrx `bootstrap`); the functions live next to their Rust in
-- extension/src/<area>.sql, the grants last in sql/grants.sql.
--
-- Citus fit: every key of a high-volume per-org table (meter_event,
-- audit_log) starts with organization_id; organization and api_key are small
-- enough to be reference tables. No hot-path query joins across orgs.

-- Tunables are GUCs (ALTER DATABASE ... SET polar_meter.x = ...); this is the
-- one place their defaults are read.
CREATE FUNCTION meter._setting(name text, fallback text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT coalesce(nullif(current_setting('polar_meter.' || name, true), ''), fallback) $$;
COMMENT ON FUNCTION meter._setting(text, text) IS
  'Internal: the value of GUC polar_meter.<name>, or fallback when it is unset or empty.';

CREATE TABLE meter.organization (
    id                text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
    name              text NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    email             text,
    polar_customer_id text UNIQUE,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- Provisioning of the Polar customer (see extension/src/provision.sql).
    provision_attempts int NOT NULL DEFAULT 0,
    provision_next_at  timestamptz NOT NULL DEFAULT now(),
    provision_error    text
);
CREATE INDEX organization_unprovisioned ON meter.organization (provision_next_at) WHERE polar_customer_id IS NULL;
COMMENT ON TABLE meter.organization IS
  'A customer of the platform; billed at Polar as a team customer with external_id = id.';

CREATE TABLE meter.api_key (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id text NOT NULL REFERENCES meter.organization (id),
    name            text NOT NULL,
    start           text NOT NULL,
    key_hash        bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    permissions     text[] NOT NULL DEFAULT '{fence:meter}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    revoked_at      timestamptz,
    last_used_at    timestamptz
);
CREATE INDEX api_key_organization ON meter.api_key (organization_id);
COMMENT ON TABLE meter.api_key IS
  'Opaque bearer keys (ak_ + 48 base62). Only the SHA-256 is kept; the key is shown once, at creation.';

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
-- organization and key rows (multixacts under load). record_event checks
-- both, and organizations and keys can never be deleted (triggers below).
CREATE INDEX meter_event_due ON meter.meter_event (next_attempt_at)
    WHERE polar_status IN ('pending', 'failed', 'in_flight');
CREATE INDEX meter_event_window ON meter.meter_event (event_timestamp);
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
    -- Read after the id was taken: any transaction that could still commit a
    -- lower id started before this instant (see meter.seal_audit_log).
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    prev_hash       bytea,
    row_hash        bytea,
    PRIMARY KEY (organization_id, id)
);
ALTER SEQUENCE meter.audit_log_id_seq OWNED BY meter.audit_log.id;
CREATE INDEX audit_log_unsealed ON meter.audit_log (id) WHERE row_hash IS NULL;
COMMENT ON TABLE meter.audit_log IS
  'Append-only, hash-chained in id order by meter.seal_audit_log(); meter.verify_audit_chain() checks it.';

-- The sealed end of the chain. One row, created by the first seal (not here,
-- so that a pg_dump restore brings it back without a conflict); the sealer
-- locks it, so sealers never overlap, while record_event never touches it.
CREATE TABLE meter.audit_chain (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id   bigint NOT NULL DEFAULT 0,
    last_hash bytea NOT NULL DEFAULT '\x'
);

-- When each alert last fired, so a standing condition alerts once an hour,
-- not on every cron tick.
CREATE TABLE meter.alert_state (
    kind            text NOT NULL,
    organization_id text NOT NULL DEFAULT '',
    last_at         timestamptz NOT NULL,
    PRIMARY KEY (kind, organization_id)
);

CREATE SEQUENCE meter.reconcile_run_id_seq;
CREATE TABLE meter.reconcile_run (
    id           bigint PRIMARY KEY DEFAULT nextval('meter.reconcile_run_id_seq'),
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL CHECK (window_end > window_start),
    status       text NOT NULL DEFAULT 'requested'
        CHECK (status IN ('requested', 'running', 'done', 'failed')),
    requested_by text NOT NULL DEFAULT session_user,
    created_at   timestamptz NOT NULL DEFAULT now(),
    lease_until  timestamptz,
    pages_done   int NOT NULL DEFAULT 0,   -- Polar pages handed back: a resumed run starts after them
    finished_at  timestamptz,
    drift        bigint,
    drift_ratio  double precision,
    result       jsonb
);

-- What Polar listed for a run's window, one row per Polar event, handed back
-- a page at a time (never a whole window in the sidecar's memory).
CREATE TABLE meter.reconcile_remote (
    run_id               bigint NOT NULL REFERENCES meter.reconcile_run (id),
    polar_event_id       text NOT NULL,
    meter_event_id       uuid,          -- from metadata; NULL for events we never sent
    external_customer_id text,
    event_name           text NOT NULL,
    event_timestamp      timestamptz NOT NULL,
    PRIMARY KEY (run_id, polar_event_id)
);
CREATE INDEX reconcile_remote_event ON meter.reconcile_remote (run_id, meter_event_id);
ALTER SEQUENCE meter.reconcile_run_id_seq OWNED BY meter.reconcile_run.id;
COMMENT ON TABLE meter.reconcile_run IS 'One reconciliation of a time window against Polar, and its result.';

-- Without this pg_dump leaves extension-owned rows out: lost billing records.
SELECT pg_catalog.pg_extension_config_dump('meter.organization', '');
SELECT pg_catalog.pg_extension_config_dump('meter.api_key', '');
SELECT pg_catalog.pg_extension_config_dump('meter.meter_event', '');
SELECT pg_catalog.pg_extension_config_dump('meter.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('meter.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('meter.audit_chain', '');
SELECT pg_catalog.pg_extension_config_dump('meter.alert_state', '');
SELECT pg_catalog.pg_extension_config_dump('meter.reconcile_run', '');
SELECT pg_catalog.pg_extension_config_dump('meter.reconcile_run_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('meter.reconcile_remote', '');

-- Results of the hot-path functions. Composite (not SETOF) returns make a call
-- a plain expression: no set-returning machinery per recorded event.
CREATE TYPE meter.key_identity AS (organization_id text, api_key_id uuid);
COMMENT ON TYPE meter.key_identity IS 'What a verified API key stands for: its organization and its id.';
CREATE TYPE meter.recording AS (status text, event_id uuid);
COMMENT ON TYPE meter.recording IS 'The outcome of record_event: status recorded or already_recorded, and the event id.';

-- Raises a rule violation returned by a Rust check as {sqlstate, message}.
CREATE FUNCTION meter._raise(violation text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF violation IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = violation[1], MESSAGE = violation[2];
    END IF;
END
$$;
COMMENT ON FUNCTION meter._raise(text[]) IS
  'Internal: raise {sqlstate, message} (a violation from a Rust rule check); no-op on NULL.';
