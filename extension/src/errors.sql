-- Errors: the table of causes (Rust: polar_meter_rules::sqlstate) and the
-- one way Rust helpers report a broken rule, {sqlstate, message}, raised here.
-- Also the COMMENTs of every Rust helper, so each is documented in one place.

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

-- Every claim (events, organizations, alerts, reconcile runs) takes a size
-- and a lease; one rule for both.
CREATE FUNCTION meter._lease_until(size_name text, size int, lease interval) RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF (size_name IS NOT NULL AND (size IS NULL OR size < 1)) OR lease IS NULL OR lease <= interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = 'PM050',
            MESSAGE = coalesce(size_name || ' must be >= 1 and ', '') || 'lease must be a positive interval';
    END IF;
    RETURN now() + lease;
END
$$;
COMMENT ON FUNCTION meter._lease_until(text, int, interval) IS
  'Internal: when a claim''s lease ends (now() + lease); PM050 unless the lease is positive and, when size_name is given, size >= 1.';

COMMENT ON FUNCTION meter.error_codes() IS
  'Every SQLSTATE polar_meter raises (class PM), one per cause: its name, the HTTP status and RFC 9457 problem type polar-meterd answers with, a title and the cause.';
COMMENT ON FUNCTION meter._setting_default(text) IS 'Internal: the default of a setting (Rust, polar_meter_rules::settings), NULL for an unknown name.';
COMMENT ON FUNCTION meter._setting_catalog() IS 'Internal: every setting with its default, kind, bounds and description (Rust, polar_meter_rules::settings).';
COMMENT ON FUNCTION meter._generate_api_key() IS
  'Internal: a new plaintext key, ak_ + 48 base62 characters from the OS CSPRNG (Rust, polar_meter_rules::keys).';
COMMENT ON FUNCTION meter._api_key_wellformed(text) IS
  'Internal: true when text has the exact shape of a key; checked before any lookup.';
COMMENT ON FUNCTION meter._key_hash(text) IS 'Internal: what api_key.key_hash stores for a key (SHA-256 of its UTF-8 bytes).';
COMMENT ON FUNCTION meter._api_key_start(text) IS 'Internal: what api_key.start stores: ak_ and the next 4 characters.';
COMMENT ON FUNCTION meter._organization_violation(text, text, text, text, text, text) IS
  'Internal: NULL when Polar would accept the organization as a team customer, else {PM036, message} (Rust, polar_meter_rules::validate::organization).';
COMMENT ON FUNCTION meter._prepare_batch(text, jsonb, timestamptz, bigint) IS
  'Internal: a whole batch of one organization checked, fingerprinted and given ids in one Rust pass (polar_meter_rules::batch::prepare), as one row of arrays in request order: the envelope''s violation {PM016, message}, or each item''s fields or violation, payload fingerprint, external_id, a fresh id, and whether it is the first good item of its key.';
COMMENT ON FUNCTION meter._reserved_metadata_key() IS
  'Internal: the metadata key delivery adds to every event (meter_event_id), which clients may not use.';
COMMENT ON FUNCTION meter._backoff_seconds(int, double precision, double precision, double precision) IS
  'Internal: the backoff formula in seconds (Rust, polar_meter_rules::backoff).';
COMMENT ON FUNCTION meter._max_attempts() IS 'Internal: failed deliveries after which an event is dropped (7).';
COMMENT ON FUNCTION meter._drift_violation(jsonb, jsonb) IS 'Internal: NULL when both sides of compute_drift are well formed, else {PM063, message}.';
COMMENT ON FUNCTION meter._drift(jsonb, jsonb) IS 'Internal: compute_drift''s result for well-formed sides (Rust, polar_meter_rules::drift).';
COMMENT ON FUNCTION meter._audit_chain_hashes(bytea, text[]) IS
  'Internal: the hashes of audit rows'' canonical texts chained after prev: h(i) = sha256(h(i-1) || text(i)).';
