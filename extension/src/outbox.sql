-- The delivery outbox towards Polar. Claim (commit), call Polar, report
-- (commit): no transaction is ever held open across an HTTP call.
--
-- Only sidecars claim: a claim is a lease on due events of one
-- organization (in_flight, a batch_id, next_attempt_at = the lease's end),
-- so a sidecar that dies leaves rows that are due again when it runs out,
-- and FOR UPDATE SKIP LOCKED keeps two sidecars off the same rows. An
-- organization's events are due only once its Polar customer exists.
-- Reports touch only rows the reporting batch still holds.

CREATE FUNCTION meter.backoff_delay(attempts int, jitter double precision DEFAULT random()) RETURNS interval
LANGUAGE sql
STABLE
PARALLEL SAFE
SET search_path = meter, pg_catalog, pg_temp
AS $$
    SELECT make_interval(secs => meter._backoff_seconds(attempts, jitter,
        extract(epoch FROM meter._setting('backoff_base')::interval)::float8,
        extract(epoch FROM meter._setting('backoff_cap')::interval)::float8))
$$;
COMMENT ON FUNCTION meter.backoff_delay(int, double precision) IS
  'Wait after the attempts-th failed delivery: min(cap, base * 2^(attempts-1)) * (0.75 + 0.5 * jitter), jitter in [0,1) (default random(), so +/-25%). base = setting backoff_base (default 60 s), cap = backoff_cap (default 6 h): about 1, 2, 4, 8, 16, 32 minutes before attempts 2..7. Pass jitter => 0.5 for the exact midpoint.';

CREATE FUNCTION meter._held(org_id text, batch_id uuid, event_ids uuid[]) RETURNS uuid[]
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_held uuid[];
BEGIN
    -- The outbox's safety rule: a report touches only the rows its batch
    -- still holds. A lease that ran out may have handed a row to another
    -- batch (or another sidecar), whose report is the one that counts. The
    -- rows are locked until the reporting transaction ends. (PL/pgSQL: Citus
    -- cannot plan a SQL function's parameters into a distributed query.)
    SELECT coalesce(array_agg(h.id), '{}') INTO v_held FROM (
        SELECT e.id FROM meter.meter_event e
        WHERE e.organization_id = org_id AND e.id = ANY (event_ids) AND e.batch_id = _held.batch_id
          AND e.polar_status = 'in_flight'
        FOR UPDATE) h;
    RETURN v_held;
END
$$;
COMMENT ON FUNCTION meter._held(text, uuid, uuid[]) IS
  'Internal: which of event_ids the batch batch_id still holds (in flight under its lease), locked for the caller''s transaction. Every delivery_* report touches only these.';

CREATE FUNCTION meter._due_organizations(max_orgs int)
RETURNS TABLE (organization_id text, oldest_due timestamptz)
LANGUAGE plpgsql
STABLE
AS $$
DECLARE
    v_now timestamptz := now();
BEGIN
    IF meter._distributed() THEN
        -- Citus cannot run a recursive CTE across shards: each shard groups
        -- its own organizations and the coordinator merges.
        RETURN QUERY
        SELECT d.org, d.due
        FROM (SELECT e.organization_id AS org, min(e.next_attempt_at) AS due FROM meter.meter_event e
              WHERE e.polar_status IN ('pending', 'failed', 'in_flight')
              GROUP BY e.organization_id) d
        JOIN meter.organization o ON o.id = d.org AND o.polar_customer_id IS NOT NULL
        WHERE d.due <= v_now
        ORDER BY d.due
        LIMIT max_orgs;
        RETURN;
    END IF;
    RETURN QUERY
    -- A skip scan over meter_event_due: one index probe per organization,
    -- however long one organization's backlog is.
    WITH RECURSIVE orgs(org) AS (
        (SELECT e.organization_id FROM meter.meter_event e
         WHERE e.polar_status IN ('pending', 'failed', 'in_flight')
         ORDER BY e.organization_id LIMIT 1)
        UNION ALL
        SELECT (SELECT e.organization_id FROM meter.meter_event e
                WHERE e.polar_status IN ('pending', 'failed', 'in_flight') AND e.organization_id > orgs.org
                ORDER BY e.organization_id LIMIT 1)
        FROM orgs WHERE orgs.org IS NOT NULL
    )
    SELECT orgs.org, d.due
    FROM orgs
    JOIN meter.organization o ON o.id = orgs.org AND o.polar_customer_id IS NOT NULL
    CROSS JOIN LATERAL (
        SELECT e.next_attempt_at AS due FROM meter.meter_event e
        WHERE e.organization_id = orgs.org AND e.polar_status IN ('pending', 'failed', 'in_flight')
        ORDER BY e.next_attempt_at LIMIT 1) d
    WHERE d.due <= v_now
    ORDER BY d.due
    LIMIT max_orgs;
END
$$;
COMMENT ON FUNCTION meter._due_organizations(int) IS
  'Internal: organizations with events due now and a Polar customer, the longest-waiting first (at most max_orgs); behind due_organizations and the health checks.';

CREATE FUNCTION meter.due_organizations(max_orgs int DEFAULT 100)
RETURNS TABLE (organization_id text, oldest_due timestamptz)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
BEGIN
    IF max_orgs IS NULL OR max_orgs < 1 OR max_orgs > meter._bound('organizations') THEN
        RAISE EXCEPTION USING ERRCODE = 'PM051',
            MESSAGE = format('max_orgs must be 1 to %s', meter._bound('organizations'));
    END IF;
    RETURN QUERY SELECT * FROM meter._due_organizations(max_orgs);
END
$$;
COMMENT ON FUNCTION meter.due_organizations(int) IS
  'Organizations with events due now and a Polar customer, the longest-waiting first (at most max_orgs). A sidecar claims one batch of each in turn, so one organization''s backlog never holds back another''s fresh events by more than one round. PM051 unless max_orgs is 1 to 1000.';

CREATE FUNCTION meter.claim_delivery(org_id text, max_events int DEFAULT 1000, lease interval DEFAULT '2 minutes')
RETURNS TABLE (batch_id uuid, event_id uuid, event_name text, event_timestamp timestamptz, external_id text,
              metadata jsonb)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_batch uuid := gen_random_uuid();
    v_now   timestamptz := now();
    v_budget bigint := meter._bound('claim_bytes');
    v_until timestamptz;
BEGIN
    v_until := meter._lease_until('max_events', max_events, lease);
    -- Delivery waits for the customer: Polar has failed to link events sent
    -- before their customer existed.
    IF NOT EXISTS (SELECT 1 FROM meter.organization o WHERE o.id = org_id AND o.polar_customer_id IS NOT NULL) THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH due AS (
        SELECT d.organization_id, d.id, d.next_attempt_at,
               -- What the event costs once sent: its metadata as stored,
               -- plus the fixed fields.
               octet_length(d.metadata::text) + 256 AS cost
        FROM meter.meter_event d
        WHERE d.organization_id = org_id AND d.polar_status IN ('pending', 'failed', 'in_flight')
          AND d.next_attempt_at <= v_now
        ORDER BY d.next_attempt_at
        LIMIT max_events
        FOR UPDATE SKIP LOCKED
    ), within AS (
        -- Bounded by bytes as well as by count, so that no stored event,
        -- whatever it holds, makes a claim (and the sidecar's memory and
        -- Polar's request) pass the budget; the first event always goes.
        SELECT x.organization_id, x.id FROM (
            SELECT due.organization_id, due.id, due.cost,
                   sum(due.cost) OVER (ORDER BY due.next_attempt_at, due.id) - due.cost AS before
            FROM due) x
        WHERE x.before = 0 OR x.before + x.cost <= v_budget
    ), claimed AS (
        UPDATE meter.meter_event e
        SET polar_status = 'in_flight', batch_id = v_batch, last_attempt_at = v_now,
            lease_expires_at = v_until, next_attempt_at = v_until
        FROM within WHERE e.organization_id = within.organization_id AND e.id = within.id
        RETURNING e.*
    )
    SELECT v_batch, c.id, c.event_name, c.event_timestamp, c.external_id, c.metadata FROM claimed c;
END
$$;
COMMENT ON FUNCTION meter.claim_delivery(text, int, interval) IS
  'Claims up to max_events due events of one organization (pending, failed past their backoff, or in_flight past their lease) as one batch under a lease, and returns them as stored: (batch_id, event_id, event_name, event_timestamp, external_id, metadata). The sidecar turns them into Polar''s format. A claim also stops at 4 MiB of events (metadata as stored, plus 256 bytes each; the first event always goes). Nothing while the organization has no Polar customer. PM050 unless max_events is 1 to 1000 and the lease at most 10 minutes.';

CREATE FUNCTION meter.claim_events(org_id text, max_events int DEFAULT 1000, lease interval DEFAULT '2 minutes')
RETURNS TABLE (batch_id uuid, event_id uuid, payload jsonb)
LANGUAGE sql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
    -- Polar's EventCreateExternalCustomer, as 0.3 sidecars expect it.
    SELECT c.batch_id, c.event_id, jsonb_build_object(
        'name', c.event_name,
        'external_customer_id', org_id,
        'external_id', c.external_id,
        'timestamp', to_char(c.event_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'metadata', c.metadata || jsonb_build_object(meter._reserved_metadata_key(), c.event_id::text))
    FROM meter.claim_delivery(org_id, max_events, lease) c
$$;
COMMENT ON FUNCTION meter.claim_events(text, int, interval) IS
  'Deprecated since 0.4.0, removed in 0.5.0: kept for 0.3 sidecars during a rolling upgrade. claim_delivery, with each event as Polar''s ingest body (payload).';

CREATE FUNCTION meter.delivery_sent(org_id text, batch_id uuid, event_ids uuid[]) RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now  timestamptz := now();
    v_late timestamptz := now() - meter._setting('reconcile_lag')::interval;
    v_held uuid[] := meter._held(org_id, batch_id, event_ids);
    v_days date[];
    n int;
BEGIN
    -- Events older than the reconcile lag may sit in a window that was
    -- already reconciled: their days are marked for the daily job to re-open.
    WITH sent AS (
        UPDATE meter.meter_event e
        SET polar_status = 'sent', sent_at = v_now, last_error = NULL, batch_id = NULL, lease_expires_at = NULL
        WHERE e.organization_id = org_id AND e.id = ANY (v_held)
        RETURNING e.event_timestamp
    )
    SELECT count(*), array_agg(DISTINCT (x.event_timestamp AT TIME ZONE 'UTC')::date) FILTER (WHERE x.event_timestamp < v_late)
    INTO n, v_days FROM sent x;
    IF v_days IS NOT NULL THEN
        INSERT INTO meter.reconcile_dirty AS d (organization_id, day, marked_at)
        SELECT org_id, x, v_now FROM unnest(v_days) x
        ON CONFLICT ON CONSTRAINT reconcile_dirty_pkey DO UPDATE SET marked_at = v_now;
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.delivery_sent(text, uuid, uuid[]) IS
  'Polar accepted these events (a 200 whose inserted + duplicates is the batch size: duplicates are events Polar already had). Marks them sent; days of late events are marked for reconciliation. Returns how many were still held by this batch.';

CREATE FUNCTION meter.delivery_deferred(org_id text, batch_id uuid, event_ids uuid[], retry_after interval)
RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_next timestamptz := now() + meter._bounded_wait('retry_after', retry_after);
    v_held uuid[] := meter._held(org_id, batch_id, event_ids);
    n int;
BEGIN
    -- Not an attempt: Polar asked us to wait (429), or Polar as a whole is
    -- unavailable (a property of the deployment, not of these events).
    UPDATE meter.meter_event e
    SET polar_status = 'pending', next_attempt_at = v_next, batch_id = NULL, lease_expires_at = NULL
    WHERE e.organization_id = org_id AND e.id = ANY (v_held);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.delivery_deferred(text, uuid, uuid[], interval) IS
  'The call did not count against these events (a 429, or Polar unavailable as a whole: bad token, unreachable, failing everywhere): they become pending again after retry_after (0 to 1 hour, else PM051; NULL: 1 second), attempts untouched.';

CREATE FUNCTION meter._dead_letters(kind text, organization_id text, event_ids uuid[], error text, detail jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    -- An audit row for each event, one alert for the organization.
    INSERT INTO meter.audit_log (organization_id, action, subject, detail)
    SELECT _dead_letters.organization_id, 'event.' || kind, x::text, jsonb_build_object('error', left(error, 500))
    FROM unnest(event_ids) x;
    PERFORM meter._sidecar_alert('event_' || kind, organization_id,
        jsonb_build_object('events', cardinality(event_ids), 'event_ids', event_ids[1:20], 'error', left(error, 500)) || detail,
        event_ids[1]::text);
END
$$;
COMMENT ON FUNCTION meter._dead_letters(text, text, uuid[], text, jsonb) IS
  'Internal: records events that stopped being delivered (kind dropped or rejected): an audit row event.<kind> each and one event_<kind> alert (at most 10 an hour per organization).';

CREATE FUNCTION meter.delivery_failed(org_id text, batch_id uuid, event_ids uuid[], error text,
                                      OUT failed int, OUT dropped int)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_max int := meter._max_attempts();
    v_now timestamptz := now();
    v_held uuid[] := meter._held(org_id, batch_id, event_ids);
    v_ids uuid[];
    v_attempts int[];
    v_last timestamptz[];
    v_next timestamptz[] := '{}';
    v_status text[] := '{}';
    v_dropped uuid[];
    n int;
    i int;
BEGIN
    SELECT array_agg(e.id), array_agg(e.attempts + 1), array_agg(coalesce(e.last_attempt_at, v_now))
    INTO v_ids, v_attempts, v_last
    FROM meter.meter_event e
    WHERE e.organization_id = org_id AND e.id = ANY (v_held);
    failed := 0;
    dropped := 0;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    -- next_attempt_at = last_attempt_at + backoff_delay(attempts), each with
    -- its own jitter, computed here: an UPDATE computes nothing from columns.
    FOR i IN 1 .. cardinality(v_ids) LOOP
        IF v_attempts[i] >= v_max THEN
            v_status := v_status || 'dropped'::text;
            v_next := v_next || 'infinity'::timestamptz;
        ELSE
            v_status := v_status || 'failed'::text;
            v_next := v_next || (v_last[i] + meter.backoff_delay(v_attempts[i]));
        END IF;
    END LOOP;
    WITH upd AS (
        UPDATE meter.meter_event e
        SET attempts = u.attempts, last_error = left(error, 1000), polar_status = u.status, next_attempt_at = u.next,
            batch_id = NULL, lease_expires_at = NULL
        FROM unnest(v_ids, v_attempts, v_status, v_next) AS u(id, attempts, status, next)
        WHERE e.organization_id = org_id AND e.id = u.id
        RETURNING e.id, e.polar_status
    )
    SELECT count(*), array_agg(f.id) FILTER (WHERE f.polar_status = 'dropped') INTO failed, v_dropped FROM upd f;
    IF v_dropped IS NOT NULL THEN
        dropped := cardinality(v_dropped);
        PERFORM meter._dead_letters('dropped', org_id, v_dropped, error,
            jsonb_build_object('attempts', v_max, 'action', 'fix the cause, then SELECT meter.requeue_dropped()'));
    END IF;
END
$$;
COMMENT ON FUNCTION meter.delivery_failed(text, uuid, uuid[], text) IS
  'A per-event failure (a 5xx or timeout on this batch while Polar is otherwise healthy): attempts + 1 and next_attempt_at = last_attempt_at + backoff_delay(attempts). The 7th failure makes an event dropped, with an audit row, an event_dropped alert and a server warning; the row is kept for requeue_dropped. Returns (failed, dropped): events still held by the batch, and how many of them were dropped.';

CREATE FUNCTION meter.delivery_unconfirmed(org_id text, batch_id uuid, event_ids uuid[], detail text,
                                           OUT failed int, OUT dropped int)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
BEGIN
    -- Polar answered 200, but its counts do not cover the batch: nothing is
    -- taken as delivered. A resend is safe (external_id dedup), and someone
    -- should look: an answer that does not add up is not Polar as we know it.
    SELECT f.failed, f.dropped INTO failed, dropped
    FROM meter.delivery_failed(org_id, batch_id, event_ids, 'Polar''s answer does not add up: ' || detail) f;
    -- Only for a batch that held events: a made-up call leaves no trace.
    IF failed > 0 THEN
        PERFORM meter._sidecar_alert('delivery_unconfirmed', org_id,
            jsonb_build_object('events', failed, 'detail', left(detail, 500)), batch_id::text);
    END IF;
END
$$;
COMMENT ON FUNCTION meter.delivery_unconfirmed(text, uuid, uuid[], text) IS
  'Polar answered 200 to an ingest whose inserted + duplicates is not the batch size: nothing is marked sent, the events count a failed attempt (as delivery_failed) and delivery_unconfirmed is raised (only when the batch still held events, at most 10 an hour per organization). Returns (failed, dropped).';

CREATE FUNCTION meter.delivery_rejected(org_id text, batch_id uuid, event_ids uuid[], error text) RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_held uuid[] := meter._held(org_id, batch_id, event_ids);
    v_ids uuid[];
BEGIN
    WITH rejected AS (
        UPDATE meter.meter_event e
        SET polar_status = 'rejected', last_error = left(error, 1000), next_attempt_at = 'infinity',
            batch_id = NULL, lease_expires_at = NULL
        WHERE e.organization_id = org_id AND e.id = ANY (v_held)
        RETURNING e.id
    )
    SELECT array_agg(r.id) INTO v_ids FROM rejected r;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM meter._dead_letters('rejected', org_id, v_ids, error);
    RETURN cardinality(v_ids);
END
$$;
COMMENT ON FUNCTION meter.delivery_rejected(text, uuid, uuid[], text) IS
  'Polar refused these events (422): they become rejected, with an audit row each and an event_rejected alert. The rest of their batch is resent at once by the sidecar.';

CREATE FUNCTION meter.delivery_too_early(org_id text, batch_id uuid, event_ids uuid[], error text) RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now    timestamptz := now();
    v_recent timestamptz := now() - meter._setting('max_future_skew')::interval;
    v_held uuid[] := meter._held(org_id, batch_id, event_ids);
    v_skewed uuid[];
    v_other  uuid[];
    n int := 0;
BEGIN
    -- Polar said "timestamp in the future". For an event within
    -- max_future_skew of our now, Polar's clock is behind ours: a short wait
    -- fixes it. For an older one, Polar is right to refuse it.
    SELECT array_agg(e.id) FILTER (WHERE e.event_timestamp > v_recent),
           array_agg(e.id) FILTER (WHERE e.event_timestamp <= v_recent)
    INTO v_skewed, v_other
    FROM meter.meter_event e
    WHERE e.organization_id = org_id AND e.id = ANY (v_held);
    IF v_skewed IS NOT NULL THEN
        n := meter.delivery_deferred(org_id, batch_id, v_skewed, interval '5 seconds');
    END IF;
    IF v_other IS NOT NULL THEN
        PERFORM meter.delivery_rejected(org_id, batch_id, v_other, error);
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.delivery_too_early(text, uuid, uuid[], text) IS
  'Polar refused these events as "in the future". Those timestamped within max_future_skew of now are retried in 5 seconds without counting an attempt (clock skew between us and Polar); the rest are rejected as by delivery_rejected. Returns how many were retried.';

CREATE FUNCTION meter.requeue_dropped(org_id text DEFAULT NULL, include_rejected boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := now();
    n bigint;
BEGIN
    UPDATE meter.meter_event e
    SET polar_status = 'pending', attempts = 0, next_attempt_at = v_now, last_error = NULL
    WHERE (e.polar_status = 'dropped' OR (include_rejected AND e.polar_status = 'rejected'))
      AND (org_id IS NULL OR e.organization_id = org_id);
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM meter._audit(coalesce(org_id, ''), 'events.requeued', NULL,
        jsonb_build_object('events', n, 'include_rejected', include_rejected));
    IF n > 0 THEN
        PERFORM pg_notify('meter_outbox', '');
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.requeue_dropped(text, boolean) IS
  'Gives dropped events (and rejected ones with include_rejected) another life once the cause is fixed: pending, attempts 0, due now. Their external_id is unchanged, so anything Polar already holds stays a duplicate. Optionally for one org. Returns the count.';

CREATE FUNCTION meter.resend_events(event_ids uuid[]) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := now();
    n bigint;
BEGIN
    UPDATE meter.meter_event e
    SET polar_status = 'pending', attempts = 0, next_attempt_at = v_now, last_error = NULL
    WHERE e.id = ANY (event_ids) AND e.polar_status IN ('sent', 'dropped', 'rejected');
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM meter._audit('', 'events.resent', NULL, jsonb_build_object('events', n, 'event_ids', event_ids[1:100]));
    IF n > 0 THEN
        PERFORM pg_notify('meter_outbox', '');
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.resend_events(uuid[]) IS
  'Sends the given events again (for example those a reconciliation found missing at Polar): pending, attempts 0, due now. Safe: they keep their external_id, so an event Polar does hold stays a duplicate there. Events in flight or pending are left alone. Returns how many were queued.';

CREATE FUNCTION meter.take_polar_slot(per_minute int) RETURNS double precision
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now  timestamptz := clock_timestamp();
    v_step interval;
    b      meter.polar_budget;
    v_slot timestamptz;
BEGIN
    IF per_minute IS NULL OR per_minute < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'PM050', MESSAGE = 'per_minute must be >= 1';
    END IF;
    v_step := make_interval(secs => 60.0 / per_minute);
    INSERT INTO meter.polar_budget DEFAULT VALUES ON CONFLICT DO NOTHING;
    SELECT * INTO b FROM meter.polar_budget FOR UPDATE;
    v_slot := greatest(b.next_slot, b.paused_until, v_now);
    UPDATE meter.polar_budget SET next_slot = v_slot + v_step;
    RETURN extract(epoch FROM v_slot - v_now);
END
$$;
COMMENT ON FUNCTION meter.take_polar_slot(int) IS
  'Reserves the next slot for a Polar call in the budget every sidecar of this database shares (calls spaced 60/per_minute seconds apart, none before a 429''s Retry-After) and returns the seconds to wait for it. Call it in its own short transaction, just before the call.';

CREATE FUNCTION meter.pause_polar(retry_after interval) RETURNS timestamptz
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_until timestamptz := clock_timestamp() + meter._bounded_wait('retry_after', retry_after);
    b meter.polar_budget;
BEGIN
    INSERT INTO meter.polar_budget DEFAULT VALUES ON CONFLICT DO NOTHING;
    SELECT * INTO b FROM meter.polar_budget FOR UPDATE;
    v_until := greatest(b.paused_until, v_until);
    UPDATE meter.polar_budget SET paused_until = v_until;
    RETURN v_until;
END
$$;
COMMENT ON FUNCTION meter.pause_polar(interval) IS
  'Polar answered 429 with Retry-After: no sidecar of this database takes a slot before then. retry_after is 0 to 1 hour (else PM051); a longer pause already set stands, and an admin lifts any with meter.resume_polar(). Returns the end of the pause.';

CREATE FUNCTION meter.resume_polar() RETURNS timestamptz
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_was timestamptz;
BEGIN
    -- pause_polar keeps the greatest pause it is given, so only this (not
    -- granted to the sidecar's role) can shorten one.
    SELECT b.paused_until INTO v_was FROM meter.polar_budget b FOR UPDATE;
    UPDATE meter.polar_budget SET paused_until = '-infinity';
    IF v_was > now() THEN
        PERFORM meter._audit('', 'polar.resumed', NULL, jsonb_build_object('was_paused_until', v_was));
        PERFORM pg_notify('meter_outbox', '');
    END IF;
    RETURN v_was;
END
$$;
COMMENT ON FUNCTION meter.resume_polar() IS
  'Admin: lifts a pause of the Polar calls (pause_polar), whatever its length, writes an audit row polar.resumed and wakes the sidecars. Returns the end the pause had. Not granted to the sidecar''s role.';

CREATE FUNCTION meter.drain_meter_outbox() RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_alerts int;
BEGIN
    -- The database cannot call Polar: the cron job wakes the sidecars (a
    -- hint without payload) and checks that delivery is healthy.
    PERFORM pg_notify('meter_outbox', '');
    v_alerts := meter.check_delivery_health();
    RETURN meter.outbox_stats() || jsonb_build_object('alerts_raised', v_alerts);
END
$$;
COMMENT ON FUNCTION meter.drain_meter_outbox() IS
  'The pg_cron safety net (every 5 minutes): wakes the sidecars (NOTIFY meter_outbox), which claim and deliver, and runs check_delivery_health. Returns outbox_stats plus alerts_raised. Since 0.3 it claims nothing itself: only sidecars claim (claim_delivery).';
