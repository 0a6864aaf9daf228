-- Recording events. Everything goes through one set-based core,
-- _record_batch: one key check by the caller, every item checked,
-- fingerprinted and given its ids in one Rust pass (_prepare_batch), then
-- one statement: an INSERT ... SELECT of the new rows in idempotency-key
-- order (so concurrent batches wait on each other in one order and cannot
-- deadlock) that audits the rows it returns. Only keys it did not insert
-- are read back. A single event is a batch of one whose error is raised
-- instead of returned.

CREATE FUNCTION meter._record_batch(org_id text, api_key_id uuid, events jsonb)
RETURNS SETOF meter.batch_recording
LANGUAGE plpgsql
-- No SET search_path: only called from SECURITY DEFINER functions that set it.
-- Few statements on purpose: each costs an executor start, and a single
-- event (the common case) pays them all; Rust prepares everything per item.
-- Typed variables, not a record: a statement that reads a record's fields
-- is planned again on every call.
AS $$
DECLARE
    v_now       timestamptz := now();
    v_skew      bigint := meter._interval_us(meter._setting('max_future_skew')::interval);
    v_violation text[];
    v_idx       int[];
    v_keys      text[];
    v_names     text[];
    v_ts        timestamptz[];
    v_codes     text[];
    v_msgs      text[];
    v_hashes    bytea[];
    v_xids      text[];
    v_ids       uuid[];
    v_firsts    boolean[];
    v_valid     int;
    v_skeys     text[];
    v_sids      uuid[];
    v_shashes   bytea[];
    -- For the Citus form, one item at a time.
    v_customer  text;
    r_i int; r_k text; r_n text; r_ts timestamptz; r_h bytea; r_x text; r_id uuid; r_meta jsonb; r_due timestamptz;
BEGIN
    SELECT * INTO v_violation, v_idx, v_keys, v_names, v_ts, v_codes, v_msgs, v_hashes, v_xids, v_ids, v_firsts, v_valid
    FROM meter._prepare_batch(org_id, events, v_now, v_skew);
    IF v_violation IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = v_violation[1], MESSAGE = v_violation[2];
    END IF;

    -- The first good item of each key, in request order, is the one
    -- inserted, in key order (so concurrent batches wait on each other in one
    -- order and cannot deadlock). Each item's id is drawn beforehand, so that
    -- an item's result says whether its own row is the one its key holds. An
    -- event is not due before its own timestamp: Polar refuses events from its future.
    IF NOT meter._distributed() THEN
        -- One statement inserts the events and audits those it inserted: the
        -- rows RETURNING gives back are exactly this call's.
        WITH inserted AS (
            INSERT INTO meter.meter_event (organization_id, id, api_key_id, idempotency_key, event_name, event_timestamp,
                                           metadata, payload_hash, external_id, polar_customer_id, next_attempt_at)
            SELECT org_id, u.id, api_key_id, u.k, u.n, u.ts, coalesce(events -> u.i -> 'metadata', '{}'), u.h, u.x,
                   (SELECT o.polar_customer_id FROM meter.organization o WHERE o.id = org_id), greatest(v_now, u.ts)
            FROM unnest(v_idx, v_keys, v_names, v_ts, v_hashes, v_xids, v_ids, v_firsts) AS u(i, k, n, ts, h, x, id, first)
            WHERE u.first
            ORDER BY u.k
            ON CONFLICT ON CONSTRAINT meter_event_organization_id_idempotency_key_key DO NOTHING
            RETURNING idempotency_key AS k, id, payload_hash AS h
        ), audited AS (
            INSERT INTO meter.audit_log (organization_id, action, subject, detail)
            SELECT org_id, 'event.recorded', ins.id::text,
                   jsonb_build_object('idempotency_key', ins.k, 'payload_hash', encode(ins.h, 'hex'))
            FROM inserted ins
            ORDER BY ins.k
        )
        SELECT array_agg(ins.k), array_agg(ins.id), array_agg(ins.h) INTO v_skeys, v_sids, v_shashes FROM inserted ins;

        IF coalesce(cardinality(v_skeys), 0) = cardinality(v_idx) THEN
            -- Every item was good, the first of its key and new: the common
            -- case, answered without reading anything back.
            RETURN QUERY SELECT u.i, 'recorded'::text, u.id, NULL::text, NULL::text FROM unnest(v_idx, v_ids) AS u(i, id);
            RETURN;
        END IF;

        -- What the other keys hold: replays, and rows of concurrent
        -- transactions the INSERT waited on. A new statement, so rows those
        -- committed meanwhile are visible (READ COMMITTED).
        SELECT coalesce(v_skeys, '{}') || array_agg(e.idempotency_key), coalesce(v_sids, '{}') || array_agg(e.id),
               coalesce(v_shashes, '{}') || array_agg(e.payload_hash)
        INTO v_skeys, v_sids, v_shashes
        FROM meter.meter_event e
        WHERE e.organization_id = org_id
          AND e.idempotency_key = ANY (ARRAY(SELECT u.k FROM unnest(v_keys, v_firsts) AS u(k, first) WHERE u.first
                                             EXCEPT SELECT unnest(v_skeys)));
    ELSE
        -- The same steps in the form Citus routes to the organization's
        -- worker as they are: single-row INSERT ... VALUES and plain reads.
        -- (An INSERT ... SELECT from unnest, or a CTE used twice, would go
        -- through the coordinator to both workers and need two-phase commit.)
        v_customer := (SELECT o.polar_customer_id FROM meter.organization o WHERE o.id = org_id);
        FOR r_i, r_k, r_n, r_ts, r_h, r_x, r_id IN
            SELECT u.i, u.k, u.n, u.ts, u.h, u.x, u.id
            FROM unnest(v_idx, v_keys, v_names, v_ts, v_hashes, v_xids, v_ids, v_firsts) AS u(i, k, n, ts, h, x, id, first)
            WHERE u.first ORDER BY u.k
        LOOP
            r_meta := coalesce(events -> r_i -> 'metadata', '{}');
            r_due := greatest(v_now, r_ts);
            INSERT INTO meter.meter_event (organization_id, id, api_key_id, idempotency_key, event_name, event_timestamp,
                                           metadata, payload_hash, external_id, polar_customer_id, next_attempt_at)
            VALUES (org_id, r_id, api_key_id, r_k, r_n, r_ts, r_meta, r_h, r_x, v_customer, r_due)
            ON CONFLICT ON CONSTRAINT meter_event_organization_id_idempotency_key_key DO NOTHING;
        END LOOP;
        v_skeys := ARRAY(SELECT u.k FROM unnest(v_keys, v_firsts) AS u(k, first) WHERE u.first);
        SELECT array_agg(e.idempotency_key), array_agg(e.id), array_agg(e.payload_hash) INTO v_skeys, v_sids, v_shashes
        FROM meter.meter_event e
        WHERE e.organization_id = org_id AND e.idempotency_key = ANY (v_skeys);
        FOR r_k, r_id, r_h IN
            SELECT s.k, s.id, s.h FROM unnest(v_skeys, v_sids, v_shashes) AS s(k, id, h)
            WHERE s.id = ANY (v_ids) ORDER BY s.k
        LOOP
            PERFORM meter._audit(org_id, 'event.recorded', r_id::text,
                jsonb_build_object('idempotency_key', r_k, 'payload_hash', encode(r_h, 'hex')));
        END LOOP;
    END IF;

    IF coalesce(cardinality(v_skeys), 0) < v_valid THEN
        -- Only under REPEATABLE READ or SERIALIZABLE can a winner be invisible.
        RAISE EXCEPTION USING ERRCODE = '40001',
            MESSAGE = 'a concurrent transaction recorded one of these idempotency keys; retry';
    END IF;

    RETURN QUERY
    SELECT u.i,
           CASE WHEN u.code IS NOT NULL THEN 'error'
                WHEN s.id = u.id THEN 'recorded'
                WHEN s.h = u.h THEN 'already_recorded'
                ELSE 'error' END,
           CASE WHEN u.code IS NULL AND (s.id = u.id OR s.h = u.h) THEN s.id END,
           CASE WHEN u.code IS NOT NULL THEN u.code
                WHEN s.id = u.id OR s.h = u.h THEN NULL
                ELSE 'PM020' END,
           CASE WHEN u.code IS NOT NULL THEN u.msg
                WHEN s.id = u.id OR s.h = u.h THEN NULL
                ELSE format('idempotency_key %L was already used with a different payload (event %s)', u.k, s.id) END
    FROM unnest(v_idx, v_keys, v_codes, v_msgs, v_ids, v_hashes) AS u(i, k, code, msg, id, h)
    LEFT JOIN unnest(v_skeys, v_sids, v_shashes) AS s(k, id, h) ON s.k = u.k
    ORDER BY u.i;
END
$$;
COMMENT ON FUNCTION meter._record_batch(text, uuid, jsonb) IS
  'Internal: the set-based core of recording, for an already-authorised organization: validates every item, inserts the first of each idempotency key, writes one audit row per new event, and returns one result per item in order.';

CREATE FUNCTION meter._record_one(org_id text, api_key_id uuid, idempotency_key text, event_name text,
                                  event_timestamp jsonb, metadata jsonb) RETURNS meter.recording
LANGUAGE plpgsql
AS $$
DECLARE
    r meter.batch_recording;
BEGIN
    SELECT * INTO r FROM meter._record_batch(org_id, api_key_id, jsonb_build_array(jsonb_build_object(
        'idempotency_key', idempotency_key, 'event_name', event_name, 'event_timestamp', event_timestamp,
        'metadata', coalesce(metadata, '{}'))));
    IF r.sqlstate IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
    END IF;
    RETURN ROW(r.status, r.event_id)::meter.recording;
END
$$;
COMMENT ON FUNCTION meter._record_one(text, uuid, text, text, jsonb, jsonb) IS
  'Internal: one event through _record_batch, its error raised. The timestamp is a JSON string (RFC 3339 text, or a timestamptz''s to_jsonb).';

CREATE FUNCTION meter.record_event(
    api_key text, idempotency_key text, event_name text, event_timestamp text, metadata jsonb DEFAULT '{}'
) RETURNS meter.recording
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    -- Key first, so an unauthenticated caller learns nothing about validation.
    v meter.key_identity := meter._verify_api_key(record_event.api_key, 'fence:meter');
BEGIN
    RETURN meter._record_one(v.organization_id, v.api_key_id, idempotency_key, event_name, to_jsonb(event_timestamp), metadata);
END
$$;
COMMENT ON FUNCTION meter.record_event(text, text, text, text, jsonb) IS
  'Records one usage event for the key''s organization, with the timestamp as text (what HTTP clients send): RFC 3339 with a timezone (Z or any offset up to +/-23:59), else PM011; rounded to the microsecond. Untyped literals resolve to this form, so a naive literal is refused rather than read in the session''s zone.';

-- Typed timestamps take the text path (to_jsonb writes RFC 3339 with the
-- offset, to the microsecond), so both forms are judged by the same rules.
CREATE FUNCTION meter.record_event(
    api_key text, idempotency_key text, event_name text, event_timestamp timestamptz, metadata jsonb DEFAULT '{}'
) RETURNS meter.recording
LANGUAGE sql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$ SELECT meter.record_event(api_key, idempotency_key, event_name, to_jsonb(event_timestamp) #>> '{}', metadata) $$;
COMMENT ON FUNCTION meter.record_event(text, text, text, timestamptz, jsonb) IS
  'Records one usage event for the key''s organization: returns (status, event_id), status recorded or already_recorded. A replay with the same idempotency_key and payload returns already_recorded and the original id; a different payload raises PM020. Key errors PM001-PM005; validation PM010 name, PM011 timestamp, PM012 future timestamp, PM013 metadata, PM014 idempotency key.';

CREATE FUNCTION meter.record_events(api_key text, events jsonb)
RETURNS SETOF meter.batch_recording
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v meter.key_identity := meter._verify_api_key(record_events.api_key, 'fence:meter');
BEGIN
    RETURN QUERY SELECT * FROM meter._record_batch(v.organization_id, v.api_key_id, events);
END
$$;
COMMENT ON FUNCTION meter.record_events(text, jsonb) IS
  'Records up to 1000 events in one call and one transaction: events is a JSON array of {idempotency_key, event_name, event_timestamp, metadata?}. Returns one row per item, in order: (idx from 0, status recorded | already_recorded | error, event_id, sqlstate, message). An invalid item never blocks the others; the same idempotency key twice: the first in request order wins, a later one is already_recorded (same payload) or PM020. A bad envelope raises PM016; key errors PM001-PM005.';

CREATE FUNCTION meter.record_events_for_org(org_id text, events jsonb)
RETURNS SETOF meter.batch_recording
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM meter._require_organization(org_id);
    RETURN QUERY SELECT * FROM meter._record_batch(org_id, NULL, events);
END
$$;
COMMENT ON FUNCTION meter.record_events_for_org(text, jsonb) IS
  'record_events for DBAs: an organization''s events without an API key (api_key_id stays NULL). PM030 if the org is unknown.';

CREATE FUNCTION meter.record_event_for_org(
    org_id text, idempotency_key text, event_name text, event_timestamp text, metadata jsonb DEFAULT '{}'
) RETURNS meter.recording
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM meter._require_organization(org_id);
    RETURN meter._record_one(org_id, NULL, idempotency_key, event_name, to_jsonb(event_timestamp), metadata);
END
$$;
COMMENT ON FUNCTION meter.record_event_for_org(text, text, text, text, jsonb) IS
  'record_event_for_org with the timestamp as RFC 3339 text with a timezone (PM011 otherwise).';

CREATE FUNCTION meter.record_event_for_org(
    org_id text, idempotency_key text, event_name text, event_timestamp timestamptz, metadata jsonb DEFAULT '{}'
) RETURNS meter.recording
LANGUAGE sql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$ SELECT meter.record_event_for_org(org_id, idempotency_key, event_name, to_jsonb(event_timestamp) #>> '{}', metadata) $$;
COMMENT ON FUNCTION meter.record_event_for_org(text, text, text, timestamptz, jsonb) IS
  'record_event for DBAs: records an event for an organization without an API key (api_key_id stays NULL). Same idempotency and validation; PM030 if the org is unknown.';
