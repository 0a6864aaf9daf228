-- Alerts. An alert is a row first (meter.alert), with an audit row beside
-- it; then a wake-up (NOTIFY polar_meter_alert, no payload) and a server
-- WARNING. Sidecars claim pending alerts under a lease, forward them to
-- ALERT_WEBHOOK_URL (or log them) and mark them forwarded, so an alert raised
-- while no sidecar runs is forwarded when one starts, and with several
-- sidecars each alert is claimed by one.

CREATE FUNCTION meter._alert(kind text, organization_id text, detail jsonb, subject text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_org text := coalesce(_alert.organization_id, '');
    v_detail jsonb := coalesce(_alert.detail, '{}');
    -- Repeats of one condition share a key, so a pager folds them into one incident.
    v_dedup text := concat_ws(':', _alert.kind, v_org, _alert.subject);
    v_id bigint;
BEGIN
    INSERT INTO meter.alert (organization_id, kind, dedup_key, detail)
    VALUES (v_org, _alert.kind, v_dedup, v_detail)
    RETURNING id INTO v_id;
    PERFORM meter._audit(v_org, 'alert.' || _alert.kind, v_id::text, v_detail);
    PERFORM pg_notify('polar_meter_alert', '');
    RAISE WARNING 'polar_meter alert %: %', _alert.kind, left(v_detail::text, 500);
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION meter._alert(text, text, jsonb, text) IS
  'Internal: the one alert path: a meter.alert row (dedup_key kind:organization[:subject]), an audit row alert.<kind>, a wake-up on polar_meter_alert and a server WARNING. Returns the alert id.';

-- Alerts that functions granted to the sidecar's role raise. That role is a
-- credential that can be stolen, so what it can make others read is bounded:
-- only for organizations that exist, at most alerts_per_hour (10) of one kind
-- for one organization in an hour; past it a server warning says so instead.
CREATE FUNCTION meter._sidecar_alert(kind text, organization_id text, detail jsonb, subject text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_org text := coalesce(_sidecar_alert.organization_id, '');
    v_since timestamptz := now() - interval '1 hour';
    v_recent bigint;
BEGIN
    IF v_org <> '' AND NOT EXISTS (SELECT 1 FROM meter.organization o WHERE o.id = v_org) THEN
        RAISE WARNING 'polar_meter: no % alert for organization %, which does not exist', _sidecar_alert.kind, left(v_org, 64);
        RETURN NULL;
    END IF;
    SELECT count(*) INTO v_recent FROM meter.alert a
    WHERE a.organization_id = v_org AND a.kind = _sidecar_alert.kind AND a.raised_at > v_since;
    IF v_recent >= meter._bound('alerts_per_hour') THEN
        RAISE WARNING 'polar_meter: % alert for organization "%" not raised: % already in the last hour', _sidecar_alert.kind, left(v_org, 64), v_recent;
        RETURN NULL;
    END IF;
    RETURN meter._alert(_sidecar_alert.kind, v_org, _sidecar_alert.detail, _sidecar_alert.subject);
END
$$;
COMMENT ON FUNCTION meter._sidecar_alert(text, text, jsonb, text) IS
  'Internal: an alert raised through a function the sidecar''s role calls: only for an existing organization (or none), and at most 10 of one kind per organization an hour (past it, a server WARNING instead). Returns the alert id, or NULL when not raised.';

CREATE FUNCTION meter._alert_due(kind text, organization_id text) RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    v_now timestamptz := now();
    v_since timestamptz := now() - meter._setting('alert_repeat_after')::interval;
    v_fired boolean;
BEGIN
    INSERT INTO meter.alert_state AS s (kind, organization_id, last_at)
    VALUES (_alert_due.kind, _alert_due.organization_id, v_now)
    ON CONFLICT ON CONSTRAINT alert_state_pkey DO UPDATE SET last_at = v_now WHERE s.last_at <= v_since
    RETURNING true INTO v_fired;
    RETURN coalesce(v_fired, false);
END
$$;
COMMENT ON FUNCTION meter._alert_due(text, text) IS
  'Internal: true (and remembered) when a standing condition has not alerted within alert_repeat_after (1 hour).';

CREATE FUNCTION meter.claim_alerts(max_alerts int DEFAULT 100, lease interval DEFAULT '1 minute')
RETURNS TABLE (organization_id text, alert_id bigint, kind text, dedup_key text, raised_at timestamptz,
               detail jsonb, attempts int)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := now();
    v_until timestamptz;
    v_left int := max_alerts;
    v_org text;
    n int;
BEGIN
    v_until := meter._lease_until('max_alerts', max_alerts, lease);
    -- One organization at a time: a claim never locks rows of two organizations.
    FOR v_org IN SELECT DISTINCT a.organization_id FROM meter.alert a
                 WHERE a.status = 'pending' AND a.next_attempt_at <= v_now LOOP
        RETURN QUERY
        WITH due AS (
            SELECT a.organization_id, a.id FROM meter.alert a
            WHERE a.organization_id = v_org AND a.status = 'pending' AND a.next_attempt_at <= v_now
            ORDER BY a.id LIMIT v_left
            FOR UPDATE SKIP LOCKED
        )
        UPDATE meter.alert a SET next_attempt_at = v_until, attempts = a.attempts + 1
        FROM due WHERE a.organization_id = due.organization_id AND a.id = due.id
        RETURNING a.organization_id, a.id, a.kind, a.dedup_key, a.raised_at, a.detail, a.attempts;
        GET DIAGNOSTICS n = ROW_COUNT;
        v_left := v_left - n;
        EXIT WHEN v_left <= 0;
    END LOOP;
END
$$;
COMMENT ON FUNCTION meter.claim_alerts(int, interval) IS
  'Claims up to max_alerts pending alerts under a lease (they return to the queue when it lapses) and returns them with their try count. Used by sidecars to forward alerts.';

CREATE FUNCTION meter.alert_forwarded(org_id text, alert_id bigint) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := now();
BEGIN
    UPDATE meter.alert a SET status = 'forwarded', forwarded_at = v_now, last_error = NULL
    WHERE a.organization_id = org_id AND a.id = alert_id AND a.status = 'pending';
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION meter.alert_forwarded(text, bigint) IS
  'Marks an alert forwarded (the webhook answered 2xx, or the sidecar has no webhook and logged it). Returns false if it was not pending.';

CREATE FUNCTION meter.alert_forward_failed(org_id text, alert_id bigint, error text) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := now();
    v_tries int;
    v_max int := meter._setting('alert_max_tries')::int;
    v_next timestamptz;
    v_status text;
BEGIN
    SELECT a.attempts INTO v_tries FROM meter.alert a
    WHERE a.organization_id = org_id AND a.id = alert_id AND a.status = 'pending';
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- 2 s, 4 s, 8 s ... capped at an hour: a webhook that is down for a while
    -- still gets every alert.
    v_next := v_now + least(interval '1 hour', make_interval(secs => 2 ^ least(v_tries, 20)));
    v_status := CASE WHEN v_tries >= v_max THEN 'failed' ELSE 'pending' END;
    UPDATE meter.alert a SET status = v_status, next_attempt_at = v_next, last_error = left(error, 1000)
    WHERE a.organization_id = org_id AND a.id = alert_forward_failed.alert_id;
    IF v_status = 'failed' THEN
        RAISE WARNING 'polar_meter: alert %/% could not be forwarded after % tries: %', org_id, alert_id, v_tries, left(error, 200);
    END IF;
    RETURN v_status;
END
$$;
COMMENT ON FUNCTION meter.alert_forward_failed(text, bigint, text) IS
  'The webhook refused or could not be reached: the alert is retried with a doubling wait (capped at an hour), and after alert_max_tries it becomes failed (with a server warning). Returns the new status.';
