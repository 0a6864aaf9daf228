-- Drift computation and reconciliation runs.

CREATE FUNCTION meter.compute_drift(local jsonb, remote jsonb) RETURNS jsonb
LANGUAGE plpgsql
IMMUTABLE
PARALLEL SAFE
SET search_path = meter, pg_catalog
AS $$
DECLARE
    v jsonb := meter._compute_drift(coalesce(local, '{}'), coalesce(remote, '{}'));
BEGIN
    IF v ? 'error' THEN
        RAISE EXCEPTION USING ERRCODE = 'PM034', MESSAGE = 'compute_drift: ' || (v->>'error');
    END IF;
    RETURN v->'ok';
END
$$;
COMMENT ON FUNCTION meter.compute_drift(jsonb, jsonb) IS
  'Drift between local and remote counts. Each side: {customer: count} or {customer: {event_name: count}}. Returns {local_total, remote_total, drift, drift_ratio, customers:[{customer, local, remote, delta, drift[, event_names]}]} listing only customers that differ. delta = remote - local; drift = sum of |delta| (per event name when both sides give names); drift_ratio = drift / local_total, or 0 (no drift) / 1 (any drift) when local_total is 0. PM034 on malformed input.';

CREATE FUNCTION meter.reconcile_meter_to_polar(
    window_end timestamptz DEFAULT NULL,
    window_length interval DEFAULT '24 hours'
) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    v_end timestamptz := coalesce(window_end,
        date_trunc('hour', now() - meter._setting('reconcile_lag', '6 hours')::interval));
    v_id bigint;
BEGIN
    IF window_length IS NULL OR window_length <= interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = 'PM034', MESSAGE = 'window_length must be a positive interval';
    END IF;
    INSERT INTO meter.reconcile_run (window_start, window_end)
    VALUES (v_end - window_length, v_end)
    RETURNING id INTO v_id;
    PERFORM meter._audit('', 'reconcile.requested', v_id::text,
        jsonb_build_object('window_start', v_end - window_length, 'window_end', v_end));
    PERFORM pg_notify('meter_reconcile', v_id::text);
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION meter.reconcile_meter_to_polar(timestamptz, interval) IS
  'Opens a reconciliation run for [window_end - window_length, window_end) and wakes the sidecar (NOTIFY meter_reconcile). window_end defaults to now() minus GUC polar_meter.reconcile_lag (default 6 hours, because Polar''s event list fills asynchronously), truncated to the hour. Returns the run id.';

COMMENT ON FUNCTION meter._compute_drift(jsonb, jsonb) IS
  'Internal: {"ok": drift} or {"error": message} (Rust, polar_meter_rules::drift); meter.compute_drift raises the error as PM034.';
