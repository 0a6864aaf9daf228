-- Health: the standing conditions that alert (checked by the cron drain and
-- reported by sidecars), and the numbers an operator pages on (outbox_stats,
-- which /metrics reads on a timer).

CREATE FUNCTION meter.check_delivery_health() RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now      timestamptz := now();
    v_stale    timestamptz := now() - meter._setting('outbox_stale_after')::interval;
    v_unprov   timestamptz := now() - meter._setting('provision_alert_after')::interval;
    v_midnight timestamptz := date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    v_hour     int := meter._setting('reconcile_overdue_hour')::int;
    v_oldest   timestamptz;
    n int := 0;
    r record;
BEGIN
    -- Events due for too long, of organizations that can be delivered to
    -- (those still waiting for a customer raise customer_provisioning_failed).
    SELECT min(d.oldest_due) INTO v_oldest FROM meter._due_organizations(1000000) d;
    IF v_oldest < v_stale THEN
      -- Nested, not AND: plpgsql does not promise to short-circuit, and
      -- _alert_due records that the alert fired.
      IF meter._alert_due('outbox_stale', '') THEN
        PERFORM meter._alert('outbox_stale', '', jsonb_build_object('oldest_due_since', v_oldest,
            'organizations', (SELECT count(*) FROM meter._due_organizations(1000000) d WHERE d.oldest_due < v_stale)));
        n := n + 1;
      END IF;
    END IF;
    FOR r IN SELECT o.id, o.provision_attempts, o.provision_error, o.email IS NULL AND o.owner_email IS NULL AS no_contact
             FROM meter.organization o
             WHERE o.polar_customer_id IS NULL AND o.created_at < v_unprov LOOP
        IF meter._alert_due('customer_provisioning_failed', r.id) THEN
            PERFORM meter._alert('customer_provisioning_failed', r.id, jsonb_build_object(
                'attempts', r.provision_attempts, 'error', r.provision_error,
                'action', CASE WHEN r.no_contact
                          THEN 'Polar needs an email or an owner: SELECT meter.upsert_organization(id, name, email => ...)'
                          ELSE 'see error; SELECT meter.backfill_polar_customers() retries now' END,
                'waiting_events', (SELECT count(*) FROM meter.meter_event e
                                   WHERE e.organization_id = r.id AND e.polar_status IN ('pending', 'failed', 'in_flight'))));
            n := n + 1;
        END IF;
    END LOOP;
    -- By the configured UTC hour, a run finished today must cover a window
    -- ending yesterday or later (the daily job's).
    IF extract(hour FROM v_now AT TIME ZONE 'UTC') >= v_hour
       AND NOT EXISTS (SELECT 1 FROM meter.reconcile_run x
                       WHERE x.status = 'done' AND x.finished_at >= v_midnight AND x.window_end > v_midnight - interval '1 day') THEN
      IF meter._alert_due('reconcile_overdue', '') THEN
        PERFORM meter._alert('reconcile_overdue', '', jsonb_build_object(
            'since', v_midnight, 'by_hour_utc', v_hour,
            'last_done', (SELECT jsonb_build_object('run_id', x.id, 'window_end', x.window_end, 'finished_at', x.finished_at)
                          FROM meter.reconcile_run x WHERE x.status = 'done' ORDER BY x.finished_at DESC LIMIT 1),
            'open_runs', (SELECT count(*) FROM meter.reconcile_run x WHERE x.status IN ('requested', 'running'))),
            to_char(v_midnight, 'YYYY-MM-DD'));
        n := n + 1;
      END IF;
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.check_delivery_health() IS
  'Raises, each at most once per alert_repeat_after (1 hour): outbox_stale when an event of an organization with a customer has been due longer than setting outbox_stale_after (1 hour); customer_provisioning_failed for organizations without a Polar customer after provision_alert_after (1 hour); reconcile_overdue when, past reconcile_overdue_hour (12 UTC), no run finished today covers a window ending yesterday or later. Run by the drain job. Returns alerts raised.';

CREATE FUNCTION meter.polar_unavailable(cause text, detail jsonb DEFAULT '{}') RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_detail jsonb := meter._bounded_detail('detail', detail);
BEGIN
    -- Sidecars report every minute while Polar is unavailable; one alert
    -- goes out per alert_repeat_after, whichever sidecar reports.
    IF meter._alert_due('polar_unavailable', '') THEN
        RETURN meter._sidecar_alert('polar_unavailable', '',
            jsonb_build_object('cause', left(cause, 500)) || v_detail) IS NOT NULL;
    END IF;
    RETURN false;
END
$$;
COMMENT ON FUNCTION meter.polar_unavailable(text, jsonb) IS
  'A sidecar found Polar unavailable as a whole (token refused, unreachable, not Polar, or failing everywhere) and paused delivery: raises polar_unavailable with the cause (cut to 500 characters) and detail (at most 2 KiB, else PM051), at most once per alert_repeat_after (1 hour) and 10 an hour however often polar_available clears it. Returns whether an alert was raised.';

CREATE FUNCTION meter.polar_available() RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_was boolean;
BEGIN
    -- The next outage alerts at once rather than an hour after this one's.
    DELETE FROM meter.alert_state s WHERE s.kind = 'polar_unavailable' AND s.organization_id = ''
    RETURNING true INTO v_was;
    IF v_was THEN
        PERFORM meter._audit('', 'polar.recovered', NULL, '{}');
    END IF;
    RETURN coalesce(v_was, false);
END
$$;
COMMENT ON FUNCTION meter.polar_available() IS
  'A sidecar saw Polar answer again after polar_unavailable: the condition is cleared (audit row polar.recovered) so that a new outage alerts at once. Returns whether one was open.';

CREATE FUNCTION meter.outbox_stats() RETURNS jsonb
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := now();
    v_backlog jsonb;
    v_dead jsonb;
    v_oldest timestamptz;
    v_waiting bigint;
    v_run jsonb;
BEGIN
    -- Each count reads one partial index, never the whole table.
    SELECT coalesce(jsonb_object_agg(s.st, s.n), '{}') INTO v_backlog FROM (
        SELECT e.polar_status AS st, count(*) AS n FROM meter.meter_event e
        WHERE e.polar_status IN ('pending', 'failed', 'in_flight') GROUP BY 1) s;
    SELECT coalesce(jsonb_object_agg(s.st, s.n), '{}') INTO v_dead FROM (
        SELECT e.polar_status AS st, count(*) AS n FROM meter.meter_event e
        WHERE e.polar_status IN ('dropped', 'rejected') GROUP BY 1) s;
    SELECT min(d.oldest_due) INTO v_oldest FROM meter._due_organizations(1000000) d;
    SELECT count(*) INTO v_waiting FROM meter.meter_event e
    JOIN meter.organization o ON o.id = e.organization_id AND o.polar_customer_id IS NULL
    WHERE e.polar_status IN ('pending', 'failed', 'in_flight');
    SELECT jsonb_build_object('run_id', x.id, 'finished_at', x.finished_at, 'window_end', x.window_end,
                              'age_seconds', extract(epoch FROM v_now - x.finished_at), 'drift', x.drift,
                              'drift_ratio', x.drift_ratio, 'mode', x.mode)
    INTO v_run FROM meter.reconcile_run x WHERE x.status = 'done' ORDER BY x.finished_at DESC LIMIT 1;
    RETURN jsonb_build_object(
        'backlog', v_backlog || v_dead,
        'oldest_due_age_seconds', coalesce(extract(epoch FROM v_now - v_oldest), 0),
        'waiting_for_customer', v_waiting,
        'alerts_pending', (SELECT count(*) FROM meter.alert a WHERE a.status = 'pending'),
        'alerts_failed', (SELECT count(*) FROM meter.alert a WHERE a.status = 'failed'),
        'alerts_total', (SELECT count(*) FROM meter.alert a),
        'audit_unsealed', (SELECT count(*) FROM meter.audit_log a WHERE a.row_hash IS NULL),
        'last_reconcile', v_run,
        'reconcile_failed', (SELECT count(*) FROM meter.reconcile_run x WHERE x.status = 'failed'));
END
$$;
COMMENT ON FUNCTION meter.outbox_stats() IS
  'What an operator pages on, as JSON: events by delivery status (pending, in_flight, failed, dropped, rejected), the age of the oldest due event of an organization with a customer, events waiting for their customer, pending, failed and all alerts, unsealed audit rows, the last finished reconcile run (age, drift) and failed runs. Reads partial indexes only; polar-meterd''s /metrics reads it on a timer.';
