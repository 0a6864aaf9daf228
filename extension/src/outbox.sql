-- The delivery outbox towards Polar.

CREATE FUNCTION meter.backoff_delay(attempts int, jitter double precision DEFAULT random()) RETURNS interval
LANGUAGE sql
STABLE
PARALLEL SAFE
SET search_path = meter, pg_catalog
AS $$
    SELECT make_interval(secs => meter._backoff_seconds(attempts, jitter,
        extract(epoch FROM meter._setting('backoff_base', '60 seconds')::interval)::float8,
        extract(epoch FROM meter._setting('backoff_cap', '6 hours')::interval)::float8))
$$;
COMMENT ON FUNCTION meter.backoff_delay(int, double precision) IS
  'Wait after the attempts-th failed delivery: min(cap, base * 2^(attempts-1)) * (0.75 + 0.5 * jitter), jitter in [0,1) (default random(), so +/-25%). base = GUC polar_meter.backoff_base (default 60 s), cap = polar_meter.backoff_cap (default 6 h): about 1, 2, 4, 8, 16, 32 minutes before attempts 2..7. Pass jitter => 0.5 for the exact midpoint.';

CREATE FUNCTION meter.drain_meter_outbox() RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    v_due bigint;
BEGIN
    SELECT count(*) INTO v_due FROM meter.meter_event e
    WHERE e.polar_status IN ('pending', 'failed') AND e.next_attempt_at <= now();
    IF v_due > 0 THEN
        PERFORM pg_notify('meter_outbox', 'due');
    END IF;
    RETURN v_due;
END
$$;
COMMENT ON FUNCTION meter.drain_meter_outbox() IS
  'Cron entry point of delivery: counts due events and, when there are any, wakes the sidecar (NOTIFY meter_outbox). Returns the number due.';
