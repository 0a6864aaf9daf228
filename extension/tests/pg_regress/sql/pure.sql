-- Pure functions: answers that depend on their arguments only.
\i common/setup.sql

-- backoff_delay: min(cap, base * 2^(attempts-1)) at the jitter midpoint;
-- base 60 s, cap 6 h by default.
SELECT a AS attempts, meter.backoff_delay(a, 0.5) AS delay
FROM generate_series(1, 10) a;
-- the jitter spans +/-25%
SELECT meter.backoff_delay(3, 0) AS low, meter.backoff_delay(3, 0.999999) AS high;

-- compute_drift: what Polar holds against what we sent, per customer.
SELECT jsonb_pretty(meter.compute_drift('{"acme": 10, "beta": 5}', '{"acme": 9, "beta": 5}'));
SELECT jsonb_pretty(meter.compute_drift('{"acme": {"api.call": 3, "tokens": 2}}', '{"acme": {"api.call": 3}}'));
SELECT pg_temp.try($$SELECT meter.compute_drift('[1]', '{}')$$);

-- The permissions a key can hold.
SELECT * FROM meter.known_permissions();

-- The extension's bounds (polar_meter_rules::bounds).
SELECT n, meter._bound(n) FROM unnest(ARRAY['lease_secs', 'pause_secs', 'claim_size', 'claim_bytes',
    'detail_bytes', 'alerts_per_hour', 'organizations', 'window_secs']) n;
SELECT meter._bound('nonsense') AS unknown_bound;

-- Every SQLSTATE the extension raises, with its HTTP mapping.
SELECT sqlstate, http_status, problem_type FROM meter.error_codes() ORDER BY sqlstate;

-- Versions.
SELECT meter.extension_version(), meter.oldest_supported_sidecar();
