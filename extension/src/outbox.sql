-- The delivery outbox towards Polar. Claim (commit), call Polar, report
-- (commit): no transaction is ever held open across an HTTP call.
--
-- A claim is a lease: rows become in_flight with a batch_id and
-- next_attempt_at = lease end, so a drainer that dies leaves rows that are
-- due again when the lease runs out. Claims use FOR UPDATE SKIP LOCKED, so
-- concurrent drainers never hold the same row. Reports only touch rows still
-- held by the reporting batch.

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
COMMENT ON FUNCTION meter._backoff_seconds(int, double precision, double precision, double precision) IS
  'Internal: the backoff formula in seconds (Rust, polar_meter_rules::backoff).';

CREATE FUNCTION meter._alert(kind text, organization_id text, detail jsonb) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_payload text;
BEGIN
    PERFORM meter._audit(coalesce(organization_id, ''), 'alert.' || kind, NULL, detail);
    -- NOTIFY payloads must stay under 8000 bytes: the detail is cut, never the alert.
    v_payload := jsonb_build_object('kind', kind, 'organization_id', organization_id, 'at', now(), 'detail', detail)::text;
    IF octet_length(v_payload) > 7000 THEN
        v_payload := jsonb_build_object('kind', kind, 'organization_id', organization_id, 'at', now(),
            'detail', jsonb_build_object('truncated', true, 'summary', left(detail::text, 3000)))::text;
    END IF;
    PERFORM pg_notify('polar_meter_alert', v_payload);
    RAISE WARNING 'polar_meter alert %: %', kind, left(detail::text, 500);
END
$$;
COMMENT ON FUNCTION meter._alert(text, text, jsonb) IS
  'Internal: the one alert path: an audit row (alert.<kind>), NOTIFY polar_meter_alert (the sidecar logs it and forwards it to ALERT_WEBHOOK_URL) and a server log WARNING.';

CREATE FUNCTION meter._event_payload(e meter.meter_event) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT jsonb_build_object(
        'name', e.event_name,
        'external_customer_id', e.organization_id,
        'external_id', e.external_id,
        'timestamp', to_char(e.event_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        -- Polar's event list does not return external_id; reconciliation
        -- matches on this instead.
        'metadata', e.metadata || jsonb_build_object('meter_event_id', e.id::text))
$$;
COMMENT ON FUNCTION meter._event_payload(meter.meter_event) IS
  'Internal: the event as Polar''s EventCreateExternalCustomer: name, external_customer_id = org id, stable external_id, UTC timestamp, metadata plus meter_event_id.';

CREATE FUNCTION meter.drain_meter_outbox(
    max_events int DEFAULT 1000,
    lease interval DEFAULT '2 minutes',
    notify boolean DEFAULT true
) RETURNS TABLE (batch_id uuid, event_id uuid, payload jsonb)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    v_batch uuid := gen_random_uuid();
    v_n bigint;
BEGIN
    IF max_events IS NULL OR max_events < 1 OR lease IS NULL OR lease <= interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = 'PM034', MESSAGE = 'max_events must be >= 1 and lease a positive interval';
    END IF;
    RETURN QUERY
    WITH due AS (
        SELECT d.organization_id, d.id FROM meter.meter_event d
        WHERE d.polar_status IN ('pending', 'failed', 'in_flight') AND d.next_attempt_at <= now()
          -- Polar refuses events from its future: let a skewed one ripen.
          AND d.event_timestamp <= now()
        ORDER BY d.next_attempt_at
        LIMIT max_events
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE meter.meter_event e
        SET polar_status = 'in_flight', batch_id = v_batch, last_attempt_at = now(),
            lease_expires_at = now() + lease, next_attempt_at = now() + lease
        FROM due WHERE e.organization_id = due.organization_id AND e.id = due.id
        RETURNING e.*
    )
    SELECT v_batch, c.id, meter._event_payload(c::meter.meter_event) FROM claimed c;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF notify AND v_n > 0 THEN
        -- A hint only: a sidecar takes the batch over (take_meter_batch).
        PERFORM pg_notify('meter_outbox', v_batch::text);
    END IF;
    IF notify THEN
        PERFORM meter.check_delivery_health();
    END IF;
END
$$;
COMMENT ON FUNCTION meter.drain_meter_outbox(int, interval, boolean) IS
  'Claims up to max_events due events (pending, failed past their backoff, or in_flight past their lease) as one batch under a lease, and returns (batch_id, event_id, payload) with payload ready for Polar''s ingest. With notify (the pg_cron job) it also wakes the sidecar (NOTIFY meter_outbox, payload = batch id), which takes the batch over, and checks for stale outboxes and unprovisioned orgs. The sidecar calls it with notify => false and sends what it got.';

CREATE FUNCTION meter.take_meter_batch(batch_id uuid, lease interval DEFAULT '2 minutes')
RETURNS TABLE (new_batch_id uuid, event_id uuid, payload jsonb)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    v_batch uuid := gen_random_uuid();
BEGIN
    -- Atomic hand-over: of several sidecars woken by one NOTIFY, one gets the rows.
    RETURN QUERY
    WITH moved AS (
        UPDATE meter.meter_event e
        SET batch_id = v_batch, lease_expires_at = now() + lease, next_attempt_at = now() + lease
        WHERE e.batch_id = take_meter_batch.batch_id AND e.polar_status = 'in_flight'
        RETURNING e.*
    )
    SELECT v_batch, m.id, meter._event_payload(m::meter.meter_event) FROM moved m;
END
$$;
COMMENT ON FUNCTION meter.take_meter_batch(uuid, interval) IS
  'Takes over a batch claimed by drain_meter_outbox (the cron job) under a new batch id and lease; returns its events, or nothing if another sidecar took it first.';

CREATE FUNCTION meter.delivery_sent(batch_id uuid, event_ids uuid[]) RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    n int;
BEGIN
    UPDATE meter.meter_event e
    SET polar_status = 'sent', sent_at = now(), last_error = NULL, batch_id = NULL, lease_expires_at = NULL
    WHERE e.batch_id = delivery_sent.batch_id AND e.polar_status = 'in_flight' AND e.id = ANY (event_ids);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.delivery_sent(uuid, uuid[]) IS
  'Polar accepted these events (a 200, duplicates included: Polar already had them). Marks them sent; returns how many were still held by this batch.';

CREATE FUNCTION meter.delivery_deferred(batch_id uuid, event_ids uuid[], retry_after interval) RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    n int;
BEGIN
    -- A 429 is Polar asking us to wait, not a failed attempt.
    UPDATE meter.meter_event e
    SET polar_status = 'pending', next_attempt_at = now() + greatest(coalesce(retry_after, '1 second'), '0'),
        batch_id = NULL, lease_expires_at = NULL
    WHERE e.batch_id = delivery_deferred.batch_id AND e.polar_status = 'in_flight' AND e.id = ANY (event_ids);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.delivery_deferred(uuid, uuid[], interval) IS
  'Polar rate-limited the call (429): the events become pending again after retry_after. Not counted as an attempt.';

CREATE FUNCTION meter._dead_letters(kind text, organization_id text, event_ids uuid[], error text, detail jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    -- An audit row for each event, one alert for the organization.
    PERFORM meter._audit(organization_id, 'event.' || kind, x::text, jsonb_build_object('error', left(error, 500)))
    FROM unnest(event_ids) x;
    PERFORM meter._alert('event_' || kind, organization_id,
        jsonb_build_object('events', cardinality(event_ids), 'event_ids', event_ids[1:20], 'error', left(error, 500)) || detail);
END
$$;
COMMENT ON FUNCTION meter._dead_letters(text, text, uuid[], text, jsonb) IS
  'Internal: records events that stopped being delivered (kind dropped or rejected): an audit row event.<kind> each and one event_<kind> alert.';

CREATE FUNCTION meter.delivery_failed(batch_id uuid, event_ids uuid[], error text) RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    v_max int := 7;   -- polar_meter_rules::backoff::MAX_ATTEMPTS
    n int := 0;
    r record;
BEGIN
    FOR r IN
        WITH failed AS (
            UPDATE meter.meter_event e
            SET attempts = e.attempts + 1,
                last_error = left(error, 1000),
                polar_status = CASE WHEN e.attempts + 1 >= v_max THEN 'dropped' ELSE 'failed' END,
                next_attempt_at = CASE WHEN e.attempts + 1 >= v_max THEN 'infinity'
                                       ELSE coalesce(e.last_attempt_at, now()) + meter.backoff_delay(e.attempts + 1) END,
                batch_id = NULL, lease_expires_at = NULL
            WHERE e.batch_id = delivery_failed.batch_id AND e.polar_status = 'in_flight' AND e.id = ANY (event_ids)
            RETURNING e.organization_id, e.id, e.polar_status
        )
        SELECT f.organization_id, count(*) AS n,
               array_agg(f.id) FILTER (WHERE f.polar_status = 'dropped') AS dropped
        FROM failed f GROUP BY f.organization_id
    LOOP
        n := n + r.n;
        IF r.dropped IS NOT NULL THEN
            PERFORM meter._dead_letters('dropped', r.organization_id, r.dropped, error,
                jsonb_build_object('attempts', v_max, 'action', 'fix the cause, then SELECT meter.requeue_dropped()'));
        END IF;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.delivery_failed(uuid, uuid[], text) IS
  'The call failed (5xx, timeout, connection lost, auth): attempts + 1 and next_attempt_at = last_attempt_at + backoff_delay(attempts). The 7th failure makes an event dropped, with an audit row, an event_dropped alert and a server warning; the row is kept for requeue_dropped.';

CREATE FUNCTION meter.delivery_rejected(batch_id uuid, event_ids uuid[], error text) RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    n int := 0;
    r record;
BEGIN
    FOR r IN
        WITH rejected AS (
            UPDATE meter.meter_event e
            SET polar_status = 'rejected', last_error = left(error, 1000), next_attempt_at = 'infinity',
                batch_id = NULL, lease_expires_at = NULL
            WHERE e.batch_id = delivery_rejected.batch_id AND e.polar_status = 'in_flight' AND e.id = ANY (event_ids)
            RETURNING e.organization_id, e.id
        )
        SELECT x.organization_id, array_agg(x.id) AS ids FROM rejected x GROUP BY x.organization_id
    LOOP
        n := n + cardinality(r.ids);
        PERFORM meter._dead_letters('rejected', r.organization_id, r.ids, error);
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.delivery_rejected(uuid, uuid[], text) IS
  'Polar refused these events (422): they become rejected, with an audit row each and an event_rejected alert. The rest of their batch is resent at once by the sidecar.';

CREATE FUNCTION meter.requeue_dropped(org_id text DEFAULT NULL, include_rejected boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE meter.meter_event e
    SET polar_status = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL
    WHERE (e.polar_status = 'dropped' OR (include_rejected AND e.polar_status = 'rejected'))
      AND (org_id IS NULL OR e.organization_id = org_id);
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM meter._audit(coalesce(org_id, ''), 'events.requeued', NULL,
        jsonb_build_object('events', n, 'include_rejected', include_rejected));
    IF n > 0 THEN
        PERFORM pg_notify('meter_outbox', 'requeued');
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.requeue_dropped(text, boolean) IS
  'Gives dropped events (and rejected ones with include_rejected) another life once the cause is fixed: pending, attempts 0, due now. Their external_id is unchanged, so anything Polar already holds stays a duplicate. Optionally for one org. Returns the count.';

CREATE FUNCTION meter.check_delivery_health() RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    v_oldest timestamptz;
    v_stale interval := meter._setting('outbox_stale_after', '1 hour')::interval;
    v_unprov interval := meter._setting('provision_alert_after', '1 hour')::interval;
    n int := 0;
    r record;
BEGIN
    SELECT min(e.next_attempt_at) INTO v_oldest FROM meter.meter_event e
    WHERE e.polar_status IN ('pending', 'failed', 'in_flight');
    -- Nested, not AND: plpgsql does not promise to short-circuit, and
    -- _alert_due records that the alert fired.
    IF v_oldest < now() - v_stale THEN
      IF meter._alert_due('outbox_stale', '') THEN
        PERFORM meter._alert('outbox_stale', '', jsonb_build_object('oldest_due_since', v_oldest,
            'due', (SELECT count(*) FROM meter.meter_event e WHERE e.polar_status IN ('pending', 'failed', 'in_flight')
                    AND e.next_attempt_at <= now())));
        n := n + 1;
      END IF;
    END IF;
    FOR r IN SELECT o.id, o.provision_attempts, o.provision_error FROM meter.organization o
             WHERE o.polar_customer_id IS NULL AND o.created_at < now() - v_unprov LOOP
        IF meter._alert_due('customer_provisioning_failed', r.id) THEN
            PERFORM meter._alert('customer_provisioning_failed', r.id,
                jsonb_build_object('attempts', r.provision_attempts, 'error', r.provision_error));
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.check_delivery_health() IS
  'Raises outbox_stale when an event has been due for longer than GUC polar_meter.outbox_stale_after (1 hour), and customer_provisioning_failed for orgs still without a Polar customer after polar_meter.provision_alert_after (1 hour); each at most once an hour. Run by the drain job. Returns alerts raised.';

CREATE FUNCTION meter._alert_due(kind text, organization_id text) RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    v_fired boolean;
BEGIN
    INSERT INTO meter.alert_state AS s (kind, organization_id, last_at)
    VALUES (_alert_due.kind, _alert_due.organization_id, now())
    ON CONFLICT ON CONSTRAINT alert_state_pkey DO UPDATE SET last_at = now() WHERE s.last_at < now() - interval '1 hour'
    RETURNING true INTO v_fired;
    RETURN coalesce(v_fired, false);
END
$$;
COMMENT ON FUNCTION meter._alert_due(text, text) IS 'Internal: true (and remembered) when this alert has not fired in the last hour.';

CREATE FUNCTION meter.resend_events(event_ids uuid[]) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE meter.meter_event e
    SET polar_status = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL
    WHERE e.id = ANY (event_ids) AND e.polar_status IN ('sent', 'dropped', 'rejected');
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM meter._audit('', 'events.resent', NULL, jsonb_build_object('events', n, 'event_ids', event_ids[1:100]));
    IF n > 0 THEN
        PERFORM pg_notify('meter_outbox', 'resend');
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.resend_events(uuid[]) IS
  'Sends the given events again (for example those a reconciliation found missing at Polar): pending, attempts 0, due now. Safe: they keep their external_id, so an event Polar does hold stays a duplicate there. Events in flight or pending are left alone. Returns how many were queued.';
