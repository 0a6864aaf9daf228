//! Delivery constants and the backoff formula (polar_meter_rules::backoff).
//! Claims, leases and outcomes: outbox.sql.
use pgrx::prelude::*;
use polar_meter_rules::{backoff, bounds};

#[pg_extern(immutable, strict, parallel_safe)]
fn _backoff_seconds(attempts: i32, jitter: f64, base_secs: f64, cap_secs: f64) -> f64 {
    backoff::delay_secs(attempts, jitter, base_secs, cap_secs)
}

/// Failed attempts after which an event is dropped.
#[pg_extern(immutable, parallel_safe)]
fn _max_attempts() -> i32 {
    backoff::MAX_ATTEMPTS
}

/// The most the sidecar's role may ask for (polar_meter_rules::bounds): NULL
/// for an unknown name.
#[pg_extern(immutable, strict, parallel_safe)]
fn _bound(name: &str) -> Option<i64> {
    bounds::get(name)
}
