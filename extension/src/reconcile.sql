-- Reconciliation: does Polar hold exactly the events sent for a window?
--
-- A run is opened here (daily by pg_cron, or on request) and worked by one
-- sidecar, owned through its row under a lease:
--   counts mode: reconcile_count_plan gives the local count per (customer,
--     event name); the sidecar asks Polar each pair's count (and the
--     window's total) and hands them back (reconcile_add_counts);
--     reconcile_list_plan names the pairs whose counts differ (or the whole
--     window, when Polar's total holds pairs we never sent), and only those
--     are listed event by event. A clean day costs one request per pair.
--   full mode: every event of the window is listed (weekly, and on request:
--     equal counts can hide one missing event paired with one unexpected).
-- Listed pages come back through reconcile_add_listed (as typed arrays: the
-- sidecar reads Polar's list format); reconcile_finish
-- compares, heals, records the verdict and prunes the copy of Polar's events.

CREATE FUNCTION meter._reconcile_mode(mode text) RETURNS text
LANGUAGE plpgsql
STABLE
AS $$
DECLARE
    v_every interval;
BEGIN
    IF mode IS NOT NULL THEN
        IF mode NOT IN ('counts', 'full') THEN
            RAISE EXCEPTION USING ERRCODE = 'PM062', MESSAGE = format('mode must be counts or full (got %L)', mode);
        END IF;
        RETURN mode;
    END IF;
    v_every := meter._setting('reconcile_full_every')::interval;
    IF v_every = interval '0' OR EXISTS (
        SELECT 1 FROM meter.reconcile_run r
        WHERE r.mode = 'full' AND r.status IN ('requested', 'running', 'done') AND r.created_at > now() - v_every) THEN
        RETURN 'counts';
    END IF;
    RETURN 'full';
END
$$;
COMMENT ON FUNCTION meter._reconcile_mode(text) IS
  'Internal: the mode of a new run: the one asked for, else full when no full run was opened within reconcile_full_every (7 days; 0: never by default), else counts. PM062 for an unknown mode.';

CREATE FUNCTION meter._open_reconcile_run(window_start timestamptz, window_end timestamptz, mode text) RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO meter.reconcile_run (window_start, window_end, mode)
    VALUES (_open_reconcile_run.window_start, _open_reconcile_run.window_end, _open_reconcile_run.mode)
    RETURNING id INTO v_id;
    PERFORM meter._audit('', 'reconcile.requested', v_id::text,
        jsonb_build_object('window_start', window_start, 'window_end', window_end, 'mode', mode));
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION meter._open_reconcile_run(timestamptz, timestamptz, text) IS 'Internal: inserts a requested run and its audit row.';

CREATE FUNCTION meter._reopen_late_windows() RETURNS int
LANGUAGE plpgsql
AS $$
DECLARE
    v_now timestamptz := now();
    v_since timestamptz := now() - meter._setting('reconcile_lookback')::interval;
    w record;
    n int := 0;
BEGIN
    -- The latest finished run of each window within the look-back; its window
    -- is re-opened when a day it covers gained sent events after it finished
    -- (delivery_sent marks such days).
    FOR w IN
        SELECT DISTINCT ON (r.window_start, r.window_end) r.window_start, r.window_end, r.finished_at
        FROM meter.reconcile_run r
        WHERE r.status = 'done' AND r.window_end > v_since
        ORDER BY r.window_start, r.window_end, r.finished_at DESC
    LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM meter.reconcile_run q
                              WHERE q.window_start = w.window_start AND q.window_end = w.window_end
                                AND q.status IN ('requested', 'running'));
        IF EXISTS (SELECT 1 FROM meter.reconcile_dirty d
                   WHERE d.day BETWEEN (w.window_start AT TIME ZONE 'UTC')::date AND (w.window_end AT TIME ZONE 'UTC')::date
                     AND d.marked_at > w.finished_at) THEN
            PERFORM meter._open_reconcile_run(w.window_start, w.window_end, meter._reconcile_mode(NULL));
            n := n + 1;
        END IF;
    END LOOP;
    DELETE FROM meter.reconcile_dirty d WHERE d.day < (v_since AT TIME ZONE 'UTC')::date;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter._reopen_late_windows() IS
  'Internal: opens a new run for every finished window within reconcile_lookback (35 days) that gained sent events after its last run (late events, or events sent after an outage). Returns how many.';

CREATE FUNCTION meter.reconcile_meter_to_polar(
    window_end timestamptz DEFAULT NULL,
    window_length interval DEFAULT '24 hours',
    mode text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_daily boolean := window_end IS NULL;
    v_end timestamptz := coalesce(window_end, date_trunc('hour', now() - meter._setting('reconcile_lag')::interval));
    v_id bigint;
BEGIN
    IF window_length IS NULL OR window_length <= interval '0'
       OR window_length > make_interval(secs => meter._bound('window_secs')) THEN
        RAISE EXCEPTION USING ERRCODE = 'PM060', MESSAGE = 'window_length must be a positive interval of at most 31 days';
    END IF;
    v_id := meter._open_reconcile_run(v_end - window_length, v_end, meter._reconcile_mode(mode));
    IF v_daily THEN
        PERFORM meter._reopen_late_windows();
    END IF;
    PERFORM pg_notify('meter_reconcile', '');
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION meter.reconcile_meter_to_polar(timestamptz, interval, text) IS
  'Opens a reconciliation run for [window_end - window_length, window_end) and wakes the sidecars (NOTIFY meter_reconcile). window_end defaults to now() minus setting reconcile_lag (6 hours, because Polar''s event list fills asynchronously), truncated to the hour; called so (the daily job), it also re-opens past windows that gained sent events since their last run. mode: counts (compare counts, list only where they differ) or full (list every event); default full when no full run was opened within reconcile_full_every (7 days), else counts. PM060 unless window_length is positive and at most 31 days, PM062 bad mode. Returns the run id.';

CREATE FUNCTION meter.claim_reconcile_run(lease interval DEFAULT '5 minutes', only_run bigint DEFAULT NULL)
RETURNS TABLE (run_id bigint, window_start timestamptz, window_end timestamptz, pages_done int, mode text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := now();
    v_until timestamptz;
BEGIN
    v_until := meter._lease_until(NULL, NULL, lease);
    -- A run is owned through its row: requested and due, or running under a
    -- lapsed lease (its sidecar died), and then resumed where it stopped.
    RETURN QUERY
    WITH next AS (
        SELECT r.id FROM meter.reconcile_run r
        WHERE ((r.status = 'requested' AND r.next_attempt_at <= v_now) OR (r.status = 'running' AND r.lease_until < v_now))
          AND (only_run IS NULL OR r.id = only_run)
        ORDER BY r.id LIMIT 1
        FOR UPDATE SKIP LOCKED
    )
    UPDATE meter.reconcile_run r SET status = 'running', lease_until = v_until
    FROM next WHERE r.id = next.id
    RETURNING r.id, r.window_start, r.window_end, r.pages_done, r.mode;
END
$$;
COMMENT ON FUNCTION meter.claim_reconcile_run(interval, bigint) IS
  'Takes the oldest reconcile run (or only_run) that is requested and due, or running under a lapsed lease, and returns its window, mode and how many pages of a full listing it already holds (so an interrupted run resumes).';

CREATE FUNCTION meter._running_run(run_id bigint, lease interval) RETURNS meter.reconcile_run
LANGUAGE plpgsql
AS $$
DECLARE
    r meter.reconcile_run;
    v_until timestamptz := meter._lease_until(NULL, NULL, coalesce(lease, '5 minutes'));
BEGIN
    UPDATE meter.reconcile_run x SET lease_until = v_until
    WHERE x.id = _running_run.run_id AND x.status = 'running'
    RETURNING x.* INTO r;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PM061', MESSAGE = format('reconcile run %s is not running', run_id);
    END IF;
    RETURN r;
END
$$;
COMMENT ON FUNCTION meter._running_run(bigint, interval) IS
  'Internal: the run, which must be running (PM061), with its lease extended (at most 10 minutes, else PM050).';

CREATE FUNCTION meter.reconcile_count_plan(run_id bigint, lease interval DEFAULT '5 minutes')
RETURNS TABLE (organization_id text, event_name text, local_sent bigint, remote bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    r meter.reconcile_run := meter._running_run(run_id, lease);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM meter.reconcile_count c WHERE c.run_id = r.id) THEN
        -- Every pair with an event in the window, whatever its status:
        -- Polar may hold one we have not seen acknowledged.
        INSERT INTO meter.reconcile_count (organization_id, run_id, event_name, local_sent)
        SELECT e.organization_id, r.id, e.event_name, count(*) FILTER (WHERE e.polar_status = 'sent')
        FROM meter.meter_event e
        WHERE e.event_timestamp >= r.window_start AND e.event_timestamp < r.window_end
        GROUP BY e.organization_id, e.event_name;
    END IF;
    RETURN QUERY
    SELECT NULL::text, NULL::text, (SELECT coalesce(sum(c.local_sent), 0)::bigint FROM meter.reconcile_count c WHERE c.run_id = r.id),
           r.remote_total
    UNION ALL
    (SELECT c.organization_id, c.event_name, c.local_sent, c.remote FROM meter.reconcile_count c
     WHERE c.run_id = r.id ORDER BY c.organization_id, c.event_name);
END
$$;
COMMENT ON FUNCTION meter.reconcile_count_plan(bigint, interval) IS
  'For a counts run: the local count of sent events per (customer, event name) in the window, and Polar''s count where already known (NULL: still to ask). The first row, (NULL, NULL), is the whole window. Extends the lease; PM061 unless the run is running.';

CREATE FUNCTION meter.reconcile_add_counts(run_id bigint, counts jsonb, lease interval DEFAULT '5 minutes') RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    r meter.reconcile_run := meter._running_run(run_id, lease);
    v_total bigint;
    n int;
BEGIN
    SELECT (x->>'remote')::bigint INTO v_total FROM jsonb_array_elements(counts) x
    WHERE x->>'organization_id' IS NULL AND x->>'event_name' IS NULL;
    IF v_total IS NOT NULL THEN
        UPDATE meter.reconcile_run x SET remote_total = v_total WHERE x.id = r.id;
    END IF;
    UPDATE meter.reconcile_count c SET remote = (x->>'remote')::bigint
    FROM jsonb_array_elements(counts) x
    WHERE c.run_id = r.id AND c.organization_id = x->>'organization_id' AND c.event_name = x->>'event_name';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.reconcile_add_counts(bigint, jsonb, interval) IS
  'Hands back Polar''s counts for a run: a JSON array of {organization_id, event_name, remote}, where null organization_id and event_name is the whole window. Extends the lease; returns pairs updated.';

CREATE FUNCTION meter.reconcile_list_plan(run_id bigint, lease interval DEFAULT '5 minutes')
RETURNS TABLE (organization_id text, event_name text, pages_done int)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    r meter.reconcile_run := meter._running_run(run_id, lease);
    v_pairs bigint;
BEGIN
    IF r.mode = 'counts' THEN
        SELECT sum(c.remote) INTO v_pairs FROM meter.reconcile_count c WHERE c.run_id = r.id;
        IF EXISTS (SELECT 1 FROM meter.reconcile_count c WHERE c.run_id = r.id AND c.remote IS NULL) THEN
            RAISE EXCEPTION USING ERRCODE = 'PM061', MESSAGE = format('reconcile run %s still has pairs to count', r.id);
        END IF;
        IF r.remote_total IS DISTINCT FROM coalesce(v_pairs, 0) THEN
            -- Polar holds events under pairs we never sent: only a full
            -- listing can name them.
            UPDATE meter.reconcile_run x SET mode = 'full',
                result = jsonb_build_object('escalated', 'Polar''s total differs from the sum of its per-pair counts')
            WHERE x.id = r.id;
            r.mode := 'full';
        ELSE
            UPDATE meter.reconcile_count c SET listed = true
            WHERE c.run_id = r.id AND c.remote IS DISTINCT FROM c.local_sent AND NOT c.listed;
            RETURN QUERY SELECT c.organization_id, c.event_name, c.pages_done FROM meter.reconcile_count c
                         WHERE c.run_id = r.id AND c.listed ORDER BY c.organization_id, c.event_name;
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT NULL::text, NULL::text, r.pages_done;
END
$$;
COMMENT ON FUNCTION meter.reconcile_list_plan(bigint, interval) IS
  'What a run must list event by event, with the pages already handed back: for a counts run, each (customer, event name) whose counts differ; for a full run, or a counts run whose window total at Polar differs from the sum of its pairs (it becomes full), the whole window (NULL, NULL).';

CREATE FUNCTION meter.reconcile_add_listed(run_id bigint, organization_id text, event_name text, page int,
                                           polar_ids text[], customers text[], event_ids uuid[], names text[],
                                           timestamps timestamptz[], lease interval DEFAULT '5 minutes')
RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    r meter.reconcile_run := meter._running_run(run_id, lease);
    n int;
BEGIN
    IF cardinality(polar_ids) IS DISTINCT FROM cardinality(customers)
       OR cardinality(polar_ids) IS DISTINCT FROM cardinality(event_ids)
       OR cardinality(polar_ids) IS DISTINCT FROM cardinality(names)
       OR cardinality(polar_ids) IS DISTINCT FROM cardinality(timestamps) THEN
        RAISE EXCEPTION USING ERRCODE = 'PM051',
            MESSAGE = 'polar_ids, customers, event_ids, names and timestamps must have one element per listed event';
    END IF;
    IF cardinality(polar_ids) > 1000 THEN
        RAISE EXCEPTION USING ERRCODE = 'PM051', MESSAGE = 'polar_ids: at most 1000 listed events a call';
    END IF;
    INSERT INTO meter.reconcile_remote (organization_id, run_id, polar_event_id, meter_event_id, event_name, event_timestamp)
    SELECT coalesce(u.customer, ''), r.id, u.polar_id, u.event_id, u.name, u.ts
    FROM unnest(polar_ids, customers, event_ids, names, timestamps) AS u(polar_id, customer, event_id, name, ts)
    ON CONFLICT DO NOTHING;   -- offset pages can repeat an event: keep it once
    GET DIAGNOSTICS n = ROW_COUNT;
    IF reconcile_add_listed.organization_id IS NULL THEN
        UPDATE meter.reconcile_run x SET pages_done = greatest(x.pages_done, page) WHERE x.id = r.id;
    ELSE
        UPDATE meter.reconcile_count c SET pages_done = greatest(c.pages_done, page)
        WHERE c.run_id = r.id AND c.organization_id = reconcile_add_listed.organization_id
          AND c.event_name = reconcile_add_listed.event_name;
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.reconcile_add_listed(bigint, text, text, int, text[], text[], uuid[], text[], timestamptz[], interval) IS
  'Hands back one page of the events Polar lists for a run, one array element per event: Polar''s event id, the customer (our organization id), our event id (NULL when Polar''s copy names none), the event name and its timestamp; for one listed (customer, event name) or, with NULLs, the whole window. Repeated events are kept once. Records the page as done and extends the lease. PM051 unless the arrays are equally long and at most 1000. Returns rows added.';

CREATE FUNCTION meter.reconcile_add_remote(run_id bigint, organization_id text, event_name text, page int, events jsonb,
                                           lease interval DEFAULT '5 minutes')
RETURNS int
LANGUAGE sql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
    -- Polar's event list, as 0.3 sidecars hand it over.
    SELECT meter.reconcile_add_listed(run_id, organization_id, event_name, page,
        coalesce(array_agg(e->>'id'), '{}'),
        coalesce(array_agg(coalesce(e->>'external_customer_id', e->'customer'->>'external_id', '')), '{}'),
        coalesce(array_agg(CASE WHEN e->'metadata'->>meter._reserved_metadata_key()
                                     ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                                THEN (e->'metadata'->>meter._reserved_metadata_key())::uuid END), '{}'),
        coalesce(array_agg(e->>'name'), '{}'),
        coalesce(array_agg((e->>'timestamp')::timestamptz), '{}'),
        lease)
    FROM jsonb_array_elements(events) e
$$;
COMMENT ON FUNCTION meter.reconcile_add_remote(bigint, text, text, int, jsonb, interval) IS
  'Deprecated since 0.4.0, removed in 0.5.0: kept for 0.3 sidecars during a rolling upgrade. reconcile_add_listed, with the page as Polar''s list returns it (a JSON array of Polar''s events).';

-- reconcile_finish, in named steps.

CREATE FUNCTION meter._reconcile_heal(r meter.reconcile_run) RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_now timestamptz := now();
    v_orgs text[];
    v_ids uuid[];
    v_was text[];
    v_polar text[];
BEGIN
    -- What Polar lists is what it bills: an event given up on here (a batch
    -- that committed at Polar before its answer was lost) is in fact sent.
    SELECT array_agg(e.organization_id), array_agg(e.id), array_agg(e.polar_status), array_agg(m.polar_event_id)
    INTO v_orgs, v_ids, v_was, v_polar
    FROM meter.reconcile_remote m
    JOIN meter.meter_event e ON e.organization_id = m.organization_id AND e.id = m.meter_event_id
    WHERE m.run_id = r.id AND e.polar_status IN ('failed', 'dropped', 'rejected');
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    UPDATE meter.meter_event e
    SET polar_status = 'sent', polar_event_id = u.polar, sent_at = v_now, last_error = NULL, batch_id = NULL,
        lease_expires_at = NULL
    FROM unnest(v_orgs, v_ids, v_polar) AS u(org, id, polar)
    WHERE e.organization_id = u.org AND e.id = u.id AND e.polar_status IN ('failed', 'dropped', 'rejected');
    INSERT INTO meter.audit_log (organization_id, action, subject, detail)
    SELECT u.org, 'event.healed', u.id::text, jsonb_build_object('was', u.was, 'polar_event_id', u.polar, 'run_id', r.id)
    FROM unnest(v_orgs, v_ids, v_was, v_polar) AS u(org, id, was, polar);
    RETURN cardinality(v_ids);
END
$$;
COMMENT ON FUNCTION meter._reconcile_heal(meter.reconcile_run) IS
  'Internal: events failed, dropped or rejected here that Polar lists (by meter_event_id) become sent with their polar_event_id and an event.healed audit row. Returns how many.';

CREATE FUNCTION meter._reconcile_drift(r meter.reconcile_run, OUT drift jsonb, OUT local_sent bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    v_all boolean := r.mode = 'full';
    v_local jsonb;
    v_remote jsonb;
BEGIN
    -- Only events Polar should have (sent) count here; the backlog is reported apart.
    SELECT coalesce(jsonb_object_agg(c.org, c.names), '{}'), coalesce(sum(c.total), 0) INTO v_local, local_sent FROM (
        SELECT x.org, jsonb_object_agg(x.name, x.n) AS names, sum(x.n) AS total FROM (
            SELECT e.organization_id AS org, e.event_name AS name, count(*) AS n FROM meter.meter_event e
            WHERE e.event_timestamp >= r.window_start AND e.event_timestamp < r.window_end AND e.polar_status = 'sent'
            GROUP BY 1, 2) x
        GROUP BY x.org) c;
    -- Polar's side: what it listed, less events of ours that are still backlog
    -- here (in flight when listed: neither drift nor unexpected), plus the
    -- counts of pairs whose counts matched and were not listed.
    SELECT coalesce(jsonb_object_agg(c.org, c.names), '{}') INTO v_remote FROM (
        SELECT x.org, jsonb_object_agg(x.name, x.n) AS names FROM (
            SELECT m.organization_id AS org, m.event_name AS name, count(*) AS n
            FROM meter.reconcile_remote m
            LEFT JOIN meter.meter_event e ON e.organization_id = m.organization_id AND e.id = m.meter_event_id
            WHERE m.run_id = r.id AND (e.id IS NULL OR e.polar_status = 'sent')
            GROUP BY 1, 2
            UNION ALL
            SELECT c.organization_id, c.event_name, c.remote FROM meter.reconcile_count c
            WHERE c.run_id = r.id AND NOT v_all AND NOT c.listed AND c.remote > 0) x
        GROUP BY x.org) c;
    drift := meter.compute_drift(v_local, v_remote);
END
$$;
COMMENT ON FUNCTION meter._reconcile_drift(meter.reconcile_run) IS
  'Internal: compute_drift of the run''s window: events sent here per customer and event name against Polar''s (listed, or counted where counts matched), and the local total.';

CREATE FUNCTION meter._reconcile_events(r meter.reconcile_run) RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    v_all boolean := r.mode = 'full';
    v_missing bigint;
    v_unexpected bigint;
BEGIN
    -- Sent here, within what was listed, but absent there.
    INSERT INTO meter.reconcile_finding (organization_id, run_id, kind, event_id, event_name, event_timestamp)
    SELECT e.organization_id, r.id, 'missing_at_polar', e.id::text, e.event_name, e.event_timestamp
    FROM meter.meter_event e
    LEFT JOIN meter.reconcile_count c ON c.organization_id = e.organization_id AND c.run_id = r.id AND c.event_name = e.event_name
    LEFT JOIN meter.reconcile_remote m ON m.organization_id = e.organization_id AND m.run_id = r.id AND m.meter_event_id = e.id
    WHERE e.event_timestamp >= r.window_start AND e.event_timestamp < r.window_end AND e.polar_status = 'sent'
      AND (v_all OR c.listed) AND m.polar_event_id IS NULL;
    GET DIAGNOSTICS v_missing = ROW_COUNT;
    -- There, but never ours (usage someone else sent under our org's id).
    INSERT INTO meter.reconcile_finding (organization_id, run_id, kind, event_id, event_name, event_timestamp)
    SELECT m.organization_id, r.id, 'unexpected_at_polar', m.polar_event_id, m.event_name, m.event_timestamp
    FROM meter.reconcile_remote m
    LEFT JOIN meter.meter_event e ON e.organization_id = m.organization_id AND e.id = m.meter_event_id
    WHERE m.run_id = r.id AND e.id IS NULL;
    GET DIAGNOSTICS v_unexpected = ROW_COUNT;
    -- Matched events learn their Polar id.
    UPDATE meter.meter_event e SET polar_event_id = m.polar_event_id
    FROM meter.reconcile_remote m
    WHERE m.run_id = r.id AND e.organization_id = m.organization_id AND e.id = m.meter_event_id
      AND e.polar_event_id IS DISTINCT FROM m.polar_event_id;
    -- The result names the first 100 of each; meter.reconcile_finding keeps them all.
    RETURN jsonb_build_object(
        'missing_at_polar', jsonb_build_object('count', v_missing, 'event_ids', (
            SELECT coalesce(jsonb_agg(f.event_id::uuid ORDER BY f.event_timestamp, f.event_id), '[]') FROM (
                SELECT f.event_id, f.event_timestamp FROM meter.reconcile_finding f
                WHERE f.run_id = r.id AND f.kind = 'missing_at_polar'
                ORDER BY f.event_timestamp, f.event_id LIMIT 100) f)),
        'unexpected_at_polar', jsonb_build_object('count', v_unexpected, 'polar_event_ids', (
            SELECT coalesce(jsonb_agg(f.event_id ORDER BY f.event_timestamp, f.event_id), '[]') FROM (
                SELECT f.event_id, f.event_timestamp FROM meter.reconcile_finding f
                WHERE f.run_id = r.id AND f.kind = 'unexpected_at_polar'
                ORDER BY f.event_timestamp, f.event_id LIMIT 100) f)));
END
$$;
COMMENT ON FUNCTION meter._reconcile_events(meter.reconcile_run) IS
  'Internal: event by event, within what was listed: events sent here that Polar lacks and events at Polar we never recorded, every one into meter.reconcile_finding (the result names the first 100 of each by time), and polar_event_id filled on matched events.';

CREATE FUNCTION meter.reconcile_finish(run_id bigint) RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    r meter.reconcile_run;
    v_now timestamptz := now();
    v_healed bigint;
    v_drift jsonb;
    v_sent bigint;
    v_events jsonb;
    v_backlog jsonb;
    v_n bigint;
    v_ratio float8;
    v_max_customer float8;
    v_threshold float8 := meter._setting('drift_alert_ratio')::float8;
    v_customers jsonb;
    v_result jsonb;
BEGIN
    SELECT * INTO r FROM meter.reconcile_run x WHERE x.id = reconcile_finish.run_id FOR UPDATE;
    IF NOT FOUND OR r.status <> 'running' THEN
        RAISE EXCEPTION USING ERRCODE = 'PM061', MESSAGE = format('reconcile run %s is not running', run_id);
    END IF;

    v_healed := meter._reconcile_heal(r);
    SELECT d.drift, d.local_sent INTO v_drift, v_sent FROM meter._reconcile_drift(r) d;
    v_events := meter._reconcile_events(r);
    SELECT coalesce(jsonb_object_agg(s.polar_status, s.n), '{}') INTO v_backlog FROM (
        SELECT e.polar_status, count(*) AS n FROM meter.meter_event e
        WHERE e.event_timestamp >= r.window_start AND e.event_timestamp < r.window_end AND e.polar_status <> 'sent'
        GROUP BY e.polar_status) s;

    v_ratio := (v_drift->>'drift_ratio')::float8;
    SELECT coalesce(max(CASE WHEN (c->>'local')::bigint > 0 THEN (c->>'drift')::float8 / (c->>'local')::float8 ELSE 1 END), 0),
           jsonb_agg(c->'customer')
    INTO v_max_customer, v_customers FROM jsonb_array_elements(v_drift->'customers') c;
    SELECT count(*) INTO v_n FROM meter.reconcile_remote m WHERE m.run_id = r.id;
    v_result := coalesce(r.result, '{}') || jsonb_build_object(
        'window_start', r.window_start, 'window_end', r.window_end, 'mode', r.mode,
        'local_sent', v_sent, 'remote_total', coalesce(r.remote_total, v_n), 'remote_listed', v_n,
        'pairs_listed', (SELECT count(*) FROM meter.reconcile_count c WHERE c.run_id = r.id AND c.listed),
        'backlog', v_backlog, 'healed', v_healed,
        'drift', (v_drift->>'drift')::bigint, 'drift_ratio', v_ratio, 'max_customer_drift_ratio', v_max_customer,
        'customers', v_drift->'customers', 'alert_threshold', v_threshold) || v_events;
    UPDATE meter.reconcile_run x
    SET status = 'done', finished_at = v_now, lease_until = NULL, result = v_result, last_error = NULL,
        drift = (v_drift->>'drift')::bigint, drift_ratio = v_ratio
    WHERE x.id = r.id;
    -- The verdict keeps what matters; the copy of Polar's events goes.
    DELETE FROM meter.reconcile_remote m WHERE m.run_id = r.id;
    DELETE FROM meter.reconcile_count c WHERE c.run_id = r.id;

    IF (v_drift->>'drift')::bigint > 0 OR (v_events#>>'{missing_at_polar,count}')::bigint > 0
       OR (v_events#>>'{unexpected_at_polar,count}')::bigint > 0 THEN
        PERFORM meter._audit('', 'reconcile.drift', r.id::text,
            (v_result - 'customers') || jsonb_build_object('customers', v_customers));
        RAISE WARNING 'polar_meter reconcile run %: drift % (worst customer ratio %), % missing at Polar, % unexpected',
            r.id, v_drift->>'drift', round(v_max_customer::numeric, 4),
            v_events#>>'{missing_at_polar,count}', v_events#>>'{unexpected_at_polar,count}';
        IF v_max_customer > v_threshold THEN
            PERFORM meter._sidecar_alert('drift', '', jsonb_build_object('run_id', r.id, 'drift', (v_drift->>'drift')::bigint,
                'max_customer_drift_ratio', v_max_customer, 'threshold', v_threshold, 'customers', v_customers,
                'missing_at_polar', v_events#>'{missing_at_polar,count}',
                'unexpected_at_polar', v_events#>'{unexpected_at_polar,count}'), r.id::text);
        END IF;
    ELSE
        PERFORM meter._audit('', 'reconcile.clean', r.id::text,
            jsonb_build_object('local_sent', v_sent, 'mode', r.mode, 'healed', v_healed));
    END IF;
    RETURN v_result;
END
$$;
COMMENT ON FUNCTION meter.reconcile_finish(bigint) IS
  'Finishes a run: heals events Polar lists that were failed, dropped or rejected here; compares events sent here per customer and event name with Polar''s (compute_drift); names events missing at Polar and events there we never recorded, within what was listed; fills polar_event_id; reports the backlog apart. Drift: an audit row and a server warning, and above setting drift_alert_ratio (0.01) for the worst customer a drift alert. Stores and returns the result, and deletes the run''s copy of Polar''s events.';

CREATE FUNCTION meter.reconcile_failed(run_id bigint, error text) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := now();
    v_max int := meter._setting('reconcile_max_tries')::int;
    r meter.reconcile_run;
    v_tries int;
    v_next timestamptz;
BEGIN
    SELECT * INTO r FROM meter.reconcile_run x WHERE x.id = reconcile_failed.run_id AND x.status = 'running' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_tries := r.attempts + 1;
    IF v_tries >= v_max THEN
        UPDATE meter.reconcile_run x SET status = 'failed', attempts = v_tries, lease_until = NULL, finished_at = v_now,
            last_error = left(error, 1000)
        WHERE x.id = r.id;
        PERFORM meter._sidecar_alert('reconcile_failing', '', jsonb_build_object('run_id', r.id, 'tries', v_tries,
            'window_start', r.window_start, 'window_end', r.window_end, 'error', left(error, 500)), r.id::text);
        RETURN 'failed';
    END IF;
    -- Back to requested after a wait; the next claim resumes after the pages held.
    v_next := v_now + meter.backoff_delay(v_tries);
    UPDATE meter.reconcile_run x SET status = 'requested', attempts = v_tries, lease_until = NULL,
        next_attempt_at = v_next, last_error = left(error, 1000)
    WHERE x.id = r.id;
    RETURN 'requested';
END
$$;
COMMENT ON FUNCTION meter.reconcile_failed(bigint, text) IS
  'A run could not finish (Polar or the network failed): it is retried after backoff_delay(tries) and resumes where it stopped; after setting reconcile_max_tries (5) it becomes failed and raises reconcile_failing. Returns the new status.';
