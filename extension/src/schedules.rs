//! pg_cron jobs, installed when pg_cron is present (checked at run time, not
//! required by the control file). All of it is SQL, in schedules.sql.
pgrx::extension_sql_file!(
    "schedules.sql",
    name = "schedules",
    requires = ["outbox", "drift", "audit", "provision"]
);
