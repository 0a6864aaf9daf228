-- Idempotent event recording: key check, validation, insert and audit row in
-- one call, one transaction.

COMMENT ON FUNCTION meter._payload_hash(text, timestamptz, text) IS
  'Internal: fingerprint of what an idempotency key stands for: sha256(event_name 0x1F unix microseconds 0x1F metadata as jsonb''s canonical text).';
COMMENT ON FUNCTION meter._external_id(text, text) IS
  'Internal: the stable external_id sent to Polar for an event: pm_ + 160 bits of sha256(org 0x1F idempotency key), hex.';

CREATE FUNCTION meter._record_event(
    org_id text, api_key_id uuid, idempotency_key text, event_name text,
    event_timestamp timestamptz, metadata jsonb
) RETURNS meter.recording
LANGUAGE plpgsql
-- No SET search_path: only called from SECURITY DEFINER functions that set
-- it, and a SET on every nested call costs more than the insert's checks.
AS $$
DECLARE
    v_meta     jsonb := coalesce(metadata, '{}');
    v_text     text := v_meta::text;
    v_bad      text[];
    v_hash     bytea;
    v_ext      text;
    v_customer text;
    v_id       uuid;
    v_old      bytea;
    v_audit    bigint;
BEGIN
    -- Assignments, not PERFORM or expressions inside the INSERT: plpgsql
    -- evaluates these as plain expressions, several times faster.
    v_bad := meter._event_violation(idempotency_key, event_name, event_timestamp, v_text, now(),
        (extract(epoch FROM meter._setting('max_future_skew', '30 seconds')::interval) * 1000000)::bigint);
    IF v_bad IS NOT NULL THEN
        PERFORM meter._raise(v_bad);
    END IF;
    v_hash := meter._payload_hash(event_name, event_timestamp, v_text);
    v_ext := meter._external_id(org_id, idempotency_key);
    SELECT o.polar_customer_id INTO v_customer FROM meter.organization o WHERE o.id = org_id;

    INSERT INTO meter.meter_event AS e (organization_id, api_key_id, idempotency_key, event_name,
        event_timestamp, metadata, payload_hash, external_id, polar_customer_id)
    VALUES (org_id, api_key_id, idempotency_key, event_name, event_timestamp, v_meta, v_hash, v_ext, v_customer)
    ON CONFLICT ON CONSTRAINT meter_event_organization_id_idempotency_key_key DO NOTHING
    RETURNING e.id INTO v_id;

    IF v_id IS NOT NULL THEN
        v_audit := meter._audit(org_id, 'event.recorded', v_id::text,
            jsonb_build_object('idempotency_key', idempotency_key, 'payload_hash', encode(v_hash, 'hex')));
        RETURN ROW('recorded', v_id)::meter.recording;
    END IF;

    -- The key exists (ON CONFLICT waited for a concurrent inserter to commit).
    SELECT e.id, e.payload_hash INTO v_id, v_old
    FROM meter.meter_event e WHERE e.organization_id = org_id AND e.idempotency_key = _record_event.idempotency_key;
    IF NOT FOUND THEN
        -- Only under REPEATABLE READ or SERIALIZABLE can the winner be invisible.
        RAISE EXCEPTION USING ERRCODE = '40001',
            MESSAGE = 'a concurrent transaction recorded this idempotency_key; retry';
    END IF;
    IF v_old IS DISTINCT FROM v_hash THEN
        RAISE EXCEPTION USING ERRCODE = 'PM020',
            MESSAGE = format('idempotency_key %L was already used with a different payload (event %s)',
                             idempotency_key, v_id);
    END IF;
    RETURN ROW('already_recorded', v_id)::meter.recording;
END
$$;
COMMENT ON FUNCTION meter._record_event(text, uuid, text, text, timestamptz, jsonb) IS
  'Internal: validate and insert one event for an already-authorised organization.';

CREATE FUNCTION meter.record_event(
    api_key text, idempotency_key text, event_name text, event_timestamp timestamptz, metadata jsonb DEFAULT '{}'
) RETURNS meter.recording
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    v meter.key_identity := meter._verify_api_key(record_event.api_key, 'fence:meter');
BEGIN
    RETURN meter._record_event(v.organization_id, v.api_key_id, idempotency_key, event_name, event_timestamp, metadata);
END
$$;
COMMENT ON FUNCTION meter.record_event(text, text, text, timestamptz, jsonb) IS
  'Records one usage event for the key''s organization: returns (status, event_id), status recorded or already_recorded. A replay with the same idempotency_key and payload returns already_recorded and the original id; a different payload raises PM020. Key errors PM001-PM005; validation PM010 name, PM012 future timestamp, PM013 metadata, PM014 idempotency key.';

CREATE FUNCTION meter.record_event(
    api_key text, idempotency_key text, event_name text, event_timestamp text, metadata jsonb DEFAULT '{}'
) RETURNS meter.recording
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    -- Key first, so an unauthenticated caller learns nothing about validation.
    v     meter.key_identity := meter._verify_api_key(record_event.api_key, 'fence:meter');
    v_bad text[] := meter._timestamp_text_violation(event_timestamp);
BEGIN
    IF v_bad IS NOT NULL THEN
        PERFORM meter._raise(v_bad);
    END IF;
    RETURN meter._record_event(v.organization_id, v.api_key_id, idempotency_key, event_name,
                               event_timestamp::timestamptz, metadata);
END
$$;
COMMENT ON FUNCTION meter.record_event(text, text, text, text, jsonb) IS
  'As record_event(..., timestamptz, ...), for a timestamp given as text (what HTTP clients send): it must be RFC 3339 with a timezone (Z or +hh:mm), else PM011. Untyped literals resolve to this form, so a naive literal is refused rather than read in the session''s zone.';

CREATE FUNCTION meter.record_event_for_org(
    org_id text, idempotency_key text, event_name text, event_timestamp timestamptz, metadata jsonb DEFAULT '{}'
) RETURNS meter.recording
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
BEGIN
    PERFORM meter._require_organization(org_id);
    RETURN meter._record_event(org_id, NULL, idempotency_key, event_name, event_timestamp, metadata);
END
$$;
COMMENT ON FUNCTION meter.record_event_for_org(text, text, text, timestamptz, jsonb) IS
  'record_event for DBAs: records an event for an organization without an API key (api_key_id stays NULL). Same idempotency and validation; PM030 if the org is unknown.';

CREATE FUNCTION meter.record_event_for_org(
    org_id text, idempotency_key text, event_name text, event_timestamp text, metadata jsonb DEFAULT '{}'
) RETURNS meter.recording
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
BEGIN
    PERFORM meter._raise(meter._timestamp_text_violation(event_timestamp));
    RETURN meter.record_event_for_org(org_id, idempotency_key, event_name, event_timestamp::timestamptz, metadata);
END
$$;
COMMENT ON FUNCTION meter.record_event_for_org(text, text, text, text, jsonb) IS
  'record_event_for_org with the timestamp as RFC 3339 text with a timezone (PM011 otherwise).';

COMMENT ON FUNCTION meter._event_violation(text, text, timestamptz, text, timestamptz, bigint) IS
  'Internal: NULL when an event may be recorded, else {sqlstate, message} (Rust, polar_meter_rules::validate: the one place the rules live).';
COMMENT ON FUNCTION meter._timestamp_text_violation(text) IS
  'Internal: NULL when text is an RFC 3339 timestamp with a timezone (and not before 1970), else {sqlstate, message}.';
