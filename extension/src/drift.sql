-- Drift between what was recorded and what Polar holds (the math is Rust's,
-- polar_meter_rules::drift); reconcile.sql applies it to a run's window.

CREATE FUNCTION meter.compute_drift(local jsonb, remote jsonb) RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE
PARALLEL SAFE
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    l jsonb := coalesce(local, '{}');
    r jsonb := coalesce(remote, '{}');
BEGIN
    PERFORM meter._raise(meter._drift_violation(l, r));
    RETURN meter._drift(l, r);
END
$$;
COMMENT ON FUNCTION meter.compute_drift(jsonb, jsonb) IS
  'Drift between local and remote counts. Each side: {customer: count} or {customer: {event_name: count}}. Returns {local_total, remote_total, drift, drift_ratio, customers:[{customer, local, remote, delta, drift[, event_names]}]} listing only customers that differ. delta = remote - local; drift = sum of |delta| (per event name when both sides give names); drift_ratio = drift / local_total, or 0 (no drift) / 1 (any drift) when local_total is 0. PM063 on malformed input.';
