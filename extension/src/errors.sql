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
-- and a lease; one rule for both. The sidecar's role passes them, so they are
-- bounded (polar_meter_rules::bounds): a stolen credential can hold rows for
-- at most one lease.
CREATE FUNCTION meter._lease_until(size_name text, size int, lease interval) RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF (size_name IS NOT NULL AND (size IS NULL OR size < 1 OR size > meter._bound('claim_size')))
       OR lease IS NULL OR lease <= interval '0' OR lease > make_interval(secs => meter._bound('lease_secs')) THEN
        RAISE EXCEPTION USING ERRCODE = 'PM050',
            MESSAGE = coalesce(size_name || format(' must be 1 to %s and ', meter._bound('claim_size')), '')
                || format('lease must be a positive interval of at most %s seconds', meter._bound('lease_secs'));
    END IF;
    RETURN now() + lease;
END
$$;
COMMENT ON FUNCTION meter._lease_until(text, int, interval) IS
  'Internal: when a claim''s lease ends (now() + lease); PM050 unless the lease is positive and at most 10 minutes and, when size_name is given, size is 1 to 1000.';

-- Durations and details the sidecar's role passes outside claims.
CREATE FUNCTION meter._bounded_wait(name text, wait interval) RETURNS interval
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF wait IS NULL THEN
        RETURN interval '1 second';
    END IF;
    IF wait < interval '0' OR wait > make_interval(secs => meter._bound('pause_secs')) THEN
        RAISE EXCEPTION USING ERRCODE = 'PM051',
            MESSAGE = format('%s must be between 0 and %s seconds', name, meter._bound('pause_secs'));
    END IF;
    RETURN wait;
END
$$;
COMMENT ON FUNCTION meter._bounded_wait(text, interval) IS
  'Internal: a pause or deferral from the sidecar (NULL: 1 second); PM051 naming the argument unless it is 0 to 1 hour.';

CREATE FUNCTION meter._bounded_detail(name text, detail jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF detail IS NOT NULL AND octet_length(detail::text) > meter._bound('detail_bytes') THEN
        RAISE EXCEPTION USING ERRCODE = 'PM051',
            MESSAGE = format('%s must be at most %s bytes as JSON text', name, meter._bound('detail_bytes'));
    END IF;
    RETURN coalesce(detail, '{}');
END
$$;
COMMENT ON FUNCTION meter._bounded_detail(text, jsonb) IS
  'Internal: an alert detail from the sidecar (NULL: {}); PM051 naming the argument past 2 KiB.';

COMMENT ON FUNCTION meter.error_codes() IS
  'Every SQLSTATE polar_meter raises (class PM), one per cause: its name, the HTTP status and RFC 9457 problem type polar-meterd answers with, a title and the cause.';
COMMENT ON FUNCTION meter._bound(text) IS 'Internal: the most the sidecar''s role may ask for, by name (Rust, polar_meter_rules::bounds): lease_secs, pause_secs, claim_size, claim_bytes, detail_bytes, alerts_per_hour, organizations, window_secs.';
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
