//! The delivery outbox towards Polar. Backoff math is a pure rule; claiming,
//! leases and outcome reporting are SQL in outbox.sql.
use pgrx::prelude::*;
use polar_meter_rules::backoff;

pgrx::extension_sql_file!(
    "outbox.sql",
    name = "outbox",
    requires = ["audit", _backoff_seconds]
);

#[pg_extern(immutable, strict, parallel_safe)]
fn _backoff_seconds(attempts: i32, jitter: f64, base_secs: f64, cap_secs: f64) -> f64 {
    backoff::delay_secs(attempts, jitter, base_secs, cap_secs)
}
