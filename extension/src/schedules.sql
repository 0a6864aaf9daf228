-- pg_cron schedules. pg_cron is optional: everything here checks for it at
-- run time, and without it the extension installs and says what to schedule.

CREATE FUNCTION meter.jobs()
RETURNS TABLE (job text, jobname text, default_schedule text, command text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    VALUES ('drain',     'polar_meter_drain',     '*/5 * * * *', 'SELECT meter.drain_meter_outbox()'),
           ('reconcile', 'polar_meter_reconcile', '0 3 * * *',   'SELECT meter.reconcile_meter_to_polar()'),
           ('seal',      'polar_meter_seal',      '* * * * *',   'SELECT meter.seal_audit_log()')
$$;
COMMENT ON FUNCTION meter.jobs() IS
  'The periodic jobs polar_meter needs: drain (wakes the sidecars and checks delivery health; the sidecars drain continuously), reconcile (daily, with late windows re-opened and a full run weekly) and seal (audit chains).';

CREATE FUNCTION meter._has_pg_cron() RETURNS boolean
LANGUAGE sql STABLE
AS $$ SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_cron') $$;
COMMENT ON FUNCTION meter._has_pg_cron() IS 'Internal: is pg_cron installed in this database?';

CREATE FUNCTION meter.install_schedules() RETURNS TABLE (jobname text, schedule text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    j record;
BEGIN
    IF NOT meter._has_pg_cron() THEN
        RAISE NOTICE '%', format('polar_meter: pg_cron is not installed in this database, so no jobs were scheduled. '
            'Either install pg_cron here (shared_preload_libraries = ''pg_cron'', cron.database_name = %L) and run '
            'SELECT meter.install_schedules(); or run these yourself: %s',
            current_database(),
            (SELECT string_agg(format('%s every "%s"', x.command, x.default_schedule), '; ') FROM meter.jobs() x));
        RETURN;
    END IF;
    FOR j IN SELECT * FROM meter.jobs() LOOP
        -- Keep a schedule a DBA already changed; only add what is missing.
        IF NOT EXISTS (SELECT 1 FROM cron.job c WHERE c.jobname = j.jobname) THEN
            PERFORM cron.schedule(j.jobname, j.default_schedule, j.command);
        END IF;
    END LOOP;
    RETURN QUERY SELECT c.jobname::text, c.schedule::text FROM cron.job c
        WHERE c.jobname IN (SELECT x.jobname FROM meter.jobs() x) ORDER BY c.jobname;
END
$$;
COMMENT ON FUNCTION meter.install_schedules() IS
  'Schedules the missing polar_meter jobs in pg_cron (existing schedules are kept) and lists them. Without pg_cron: a NOTICE saying how to schedule them, and no rows. Runs on CREATE EXTENSION.';

CREATE FUNCTION meter.set_schedule(job text, schedule text) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    j record;
    v_id bigint;
BEGIN
    SELECT * INTO j FROM meter.jobs() x WHERE x.job = set_schedule.job;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PM070',
            MESSAGE = format('job must be one of %s', (SELECT string_agg(x.job, ', ') FROM meter.jobs() x));
    END IF;
    IF NOT meter._has_pg_cron() THEN
        RAISE EXCEPTION USING ERRCODE = 'PM035', MESSAGE = 'pg_cron is not installed in this database';
    END IF;
    IF schedule IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'PM071', MESSAGE = 'schedule must be a cron expression';
    END IF;
    v_id := cron.schedule(j.jobname, schedule, j.command);   -- same name: updated in place
    PERFORM meter._audit('', 'schedule.changed', j.jobname, jsonb_build_object('schedule', schedule));
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION meter.set_schedule(text, text) IS
  'Changes a job''s cron schedule (job: drain, reconcile or seal); returns the pg_cron job id. pg_cron validates the expression (it cannot go below one minute). PM070 unknown job, PM071 no schedule, PM035 no pg_cron.';

CREATE FUNCTION meter.unschedule_jobs() RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    n int := 0;
    j record;
BEGIN
    IF NOT meter._has_pg_cron() THEN
        RETURN 0;
    END IF;
    FOR j IN SELECT c.jobname FROM cron.job c WHERE c.jobname IN (SELECT x.jobname FROM meter.jobs() x) LOOP
        PERFORM cron.unschedule(j.jobname);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.unschedule_jobs() IS
  'Removes the polar_meter jobs from pg_cron; run it before DROP EXTENSION polar_meter. Returns how many were removed.';
