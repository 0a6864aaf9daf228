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

CREATE FUNCTION meter.claim_reconcile_run(lease interval DEFAULT '5 minutes', only_run bigint DEFAULT NULL)
RETURNS TABLE (run_id bigint, window_start timestamptz, window_end timestamptz, pages_done int)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
BEGIN
    -- A run is owned through its row: requested, or running under a lapsed
    -- lease (its sidecar died), and then resumed after its last page.
    RETURN QUERY
    WITH next AS (
        SELECT r.id FROM meter.reconcile_run r
        WHERE (r.status = 'requested' OR (r.status = 'running' AND r.lease_until < now()))
          AND (only_run IS NULL OR r.id = only_run)
        ORDER BY r.id LIMIT 1
        FOR UPDATE SKIP LOCKED
    )
    UPDATE meter.reconcile_run r SET status = 'running', lease_until = now() + lease
    FROM next WHERE r.id = next.id
    RETURNING r.id, r.window_start, r.window_end, r.pages_done;
END
$$;
COMMENT ON FUNCTION meter.claim_reconcile_run(interval, bigint) IS
  'Takes the oldest reconcile run (or only_run) that is requested, or running under a lapsed lease, and returns its window and how many Polar pages it already holds (so an interrupted run resumes).';

CREATE FUNCTION meter.reconcile_add_remote(run_id bigint, page int, events jsonb, lease interval DEFAULT '5 minutes')
RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    n int;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM meter.reconcile_run r WHERE r.id = reconcile_add_remote.run_id AND r.status = 'running') THEN
        RAISE EXCEPTION USING ERRCODE = 'PM034', MESSAGE = format('reconcile run %s is not running', run_id);
    END IF;
    INSERT INTO meter.reconcile_remote (run_id, polar_event_id, meter_event_id, external_customer_id, event_name, event_timestamp)
    SELECT reconcile_add_remote.run_id, e->>'id',
           CASE WHEN e->'metadata'->>'meter_event_id' ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                THEN (e->'metadata'->>'meter_event_id')::uuid END,
           coalesce(e->>'external_customer_id', e->'customer'->>'external_id'),
           e->>'name', (e->>'timestamp')::timestamptz
    FROM jsonb_array_elements(events) e
    ON CONFLICT DO NOTHING;   -- offset pages can repeat an event: keep it once
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE meter.reconcile_run r SET pages_done = greatest(r.pages_done, page), lease_until = now() + lease
    WHERE r.id = reconcile_add_remote.run_id;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.reconcile_add_remote(bigint, int, jsonb, interval) IS
  'Hands back one page of Polar''s event list for a run (events as Polar returns them); repeated events are kept once. Records the page as done and extends the lease. Returns rows added.';

CREATE FUNCTION meter.reconcile_finish(run_id bigint) RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    r meter.reconcile_run;
    v_local jsonb;
    v_remote jsonb;
    v_drift jsonb;
    v_backlog jsonb;
    v_missing bigint;
    v_missing_ids jsonb;
    v_unexpected bigint;
    v_unexpected_ids jsonb;
    v_sent bigint;
    v_ratio float8;
    v_max_customer float8;
    v_threshold float8 := meter._setting('drift_alert_ratio', '0.01')::float8;
    v_result jsonb;
BEGIN
    SELECT * INTO r FROM meter.reconcile_run x WHERE x.id = reconcile_finish.run_id FOR UPDATE;
    IF NOT FOUND OR r.status <> 'running' THEN
        RAISE EXCEPTION USING ERRCODE = 'PM034', MESSAGE = format('reconcile run %s is not running', run_id);
    END IF;

    -- Only events Polar should have (sent) count towards drift; the rest is
    -- backlog, reported apart so it is never mistaken for misreporting.
    SELECT coalesce(jsonb_object_agg(s.polar_status, s.n), '{}') INTO v_backlog FROM (
        SELECT e.polar_status, count(*) AS n FROM meter.meter_event e
        WHERE e.event_timestamp >= r.window_start AND e.event_timestamp < r.window_end AND e.polar_status <> 'sent'
        GROUP BY e.polar_status) s;
    SELECT coalesce(jsonb_object_agg(c.org, c.names), '{}'), coalesce(sum(c.total), 0) INTO v_local, v_sent FROM (
        SELECT x.org, jsonb_object_agg(x.name, x.n) AS names, sum(x.n) AS total FROM (
            SELECT e.organization_id AS org, e.event_name AS name, count(*) AS n FROM meter.meter_event e
            WHERE e.event_timestamp >= r.window_start AND e.event_timestamp < r.window_end AND e.polar_status = 'sent'
            GROUP BY 1, 2) x
        GROUP BY x.org) c;
    -- Remote: what Polar holds, less events of ours it holds that are still
    -- backlog here (in flight when listed): neither drift nor unexpected.
    SELECT coalesce(jsonb_object_agg(c.org, c.names), '{}') INTO v_remote FROM (
        SELECT x.org, jsonb_object_agg(x.name, x.n) AS names FROM (
            SELECT coalesce(m.external_customer_id, '') AS org, m.event_name AS name, count(*) AS n
            FROM meter.reconcile_remote m
            LEFT JOIN meter.meter_event e ON e.id = m.meter_event_id AND e.organization_id = m.external_customer_id
            WHERE m.run_id = r.id AND (e.id IS NULL OR e.polar_status = 'sent')
            GROUP BY 1, 2) x
        GROUP BY x.org) c;
    v_drift := meter.compute_drift(v_local, v_remote);

    -- Event level: sent here but absent there, and there but never ours.
    SELECT count(*), coalesce(jsonb_agg(e.id) FILTER (WHERE e.rn <= 100), '[]') INTO v_missing, v_missing_ids FROM (
        SELECT e.id, row_number() OVER (ORDER BY e.event_timestamp, e.id) AS rn FROM meter.meter_event e
        WHERE e.event_timestamp >= r.window_start AND e.event_timestamp < r.window_end AND e.polar_status = 'sent'
          AND NOT EXISTS (SELECT 1 FROM meter.reconcile_remote m WHERE m.run_id = r.id AND m.meter_event_id = e.id)) e;
    SELECT count(*), coalesce(jsonb_agg(m.polar_event_id) FILTER (WHERE m.rn <= 100), '[]') INTO v_unexpected, v_unexpected_ids FROM (
        SELECT m.polar_event_id, row_number() OVER (ORDER BY m.event_timestamp) AS rn FROM meter.reconcile_remote m
        WHERE m.run_id = r.id AND NOT EXISTS (
            SELECT 1 FROM meter.meter_event e WHERE e.id = m.meter_event_id AND e.organization_id = m.external_customer_id)) m;

    -- Matched events learn their Polar id.
    UPDATE meter.meter_event e SET polar_event_id = m.polar_event_id
    FROM meter.reconcile_remote m
    WHERE m.run_id = r.id AND e.id = m.meter_event_id AND e.organization_id = m.external_customer_id
      AND e.polar_event_id IS DISTINCT FROM m.polar_event_id;

    v_ratio := (v_drift->>'drift_ratio')::float8;
    SELECT coalesce(max(CASE WHEN (c->>'local')::bigint > 0 THEN (c->>'drift')::float8 / (c->>'local')::float8 ELSE 1 END), 0)
    INTO v_max_customer FROM jsonb_array_elements(v_drift->'customers') c;
    v_result := jsonb_build_object(
        'window_start', r.window_start, 'window_end', r.window_end,
        'local_sent', v_sent, 'remote_total', (SELECT count(*) FROM meter.reconcile_remote m WHERE m.run_id = r.id),
        'backlog', v_backlog,
        'drift', (v_drift->>'drift')::bigint, 'drift_ratio', v_ratio, 'max_customer_drift_ratio', v_max_customer,
        'customers', v_drift->'customers',
        'missing_at_polar', jsonb_build_object('count', v_missing, 'event_ids', v_missing_ids),
        'unexpected_at_polar', jsonb_build_object('count', v_unexpected, 'polar_event_ids', v_unexpected_ids),
        'alert_threshold', v_threshold);
    UPDATE meter.reconcile_run x
    SET status = 'done', finished_at = now(), lease_until = NULL, result = v_result,
        drift = (v_drift->>'drift')::bigint + 0, drift_ratio = v_ratio
    WHERE x.id = r.id;

    IF (v_drift->>'drift')::bigint > 0 OR v_missing > 0 OR v_unexpected > 0 THEN
        PERFORM meter._audit('', 'reconcile.drift', r.id::text, v_result - 'customers'
            || jsonb_build_object('customers', (SELECT jsonb_agg(c->'customer') FROM jsonb_array_elements(v_drift->'customers') c)));
        RAISE WARNING 'polar_meter reconcile run %: drift % (worst customer ratio %), % missing at Polar, % unexpected',
            r.id, v_drift->>'drift', round(v_max_customer::numeric, 4), v_missing, v_unexpected;
        IF v_max_customer > v_threshold THEN
            PERFORM meter._alert('drift', '', jsonb_build_object('run_id', r.id, 'drift', (v_drift->>'drift')::bigint,
                'max_customer_drift_ratio', v_max_customer, 'threshold', v_threshold,
                'customers', (SELECT jsonb_agg(c->'customer') FROM jsonb_array_elements(v_drift->'customers') c),
                'missing_at_polar', v_missing, 'unexpected_at_polar', v_unexpected));
        END IF;
    ELSE
        PERFORM meter._audit('', 'reconcile.clean', r.id::text, jsonb_build_object('local_sent', v_sent));
    END IF;
    RETURN v_result;
END
$$;
COMMENT ON FUNCTION meter.reconcile_finish(bigint) IS
  'Compares a run''s window: events sent here (per customer and event name) against what Polar listed, matched by the meter_event_id carried in metadata. Reports drift (compute_drift), events missing at Polar, events at Polar we never recorded, and the backlog (pending, in_flight, failed, dropped, rejected) apart from drift; fills polar_event_id of matched events. Drift > 0: an audit row and a server warning; the worst customer''s drift ratio above GUC polar_meter.drift_alert_ratio (0.01): a drift alert. Stores and returns the result.';

CREATE FUNCTION meter.reconcile_failed(run_id bigint, error text) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
BEGIN
    -- Back to requested: the next claim resumes after the pages already held.
    UPDATE meter.reconcile_run r SET status = 'requested', lease_until = NULL,
        result = jsonb_build_object('last_error', left(error, 1000))
    WHERE r.id = reconcile_failed.run_id AND r.status = 'running';
END
$$;
COMMENT ON FUNCTION meter.reconcile_failed(bigint, text) IS
  'A run could not finish now (Polar or the network failed): it is requested again and resumes after its last page.';
