-- The pg_cron schedules: what the extension installs, changes and removes.
-- Everything in one transaction that is rolled back: the database's own
-- schedules are left as they were.
\i common/setup.sql
BEGIN;
SELECT * FROM meter.jobs() ORDER BY 1;
SELECT count(*) AS installed FROM meter.install_schedules();
SELECT jobname, schedule FROM cron.job WHERE jobname LIKE 'polar_meter%' ORDER BY jobname;
SELECT pg_temp.try($$SELECT meter.set_schedule('drain', '*/2 * * * *')$$) AS reschedule;
SELECT schedule FROM cron.job WHERE jobname = 'polar_meter_drain';
SELECT pg_temp.try($$SELECT meter.set_schedule('nonsense', '* * * * *')$$) AS unknown_job;
SELECT pg_temp.try($$SELECT meter.set_schedule('drain', NULL)$$) AS no_schedule;
SELECT meter.unschedule_jobs() AS removed;
SELECT count(*) AS left_behind FROM cron.job WHERE jobname LIKE 'polar_meter%';
ROLLBACK;
