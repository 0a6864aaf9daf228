//! Polar as every sidecar of the database sees it: the shared call budget,
//! a pause after a 429, and whether Polar is unavailable.
use deadpool_postgres::Pool;
use serde_json::Value;
use std::time::Duration;

use super::{col, interval, one, DbError};

const TAKE_POLAR_SLOT: &str = "SELECT meter.take_polar_slot($1) AS wait_seconds";
const PAUSE_POLAR: &str = "SELECT meter.pause_polar($1::text::interval) AS until";
const POLAR_UNAVAILABLE: &str = "SELECT meter.polar_unavailable($1, $2) AS raised";
const POLAR_AVAILABLE: &str = "SELECT meter.polar_available() AS resolved";

/// Reserves this sidecar's next call; returns how long to wait for it.
pub async fn take_polar_slot(pool: &Pool, per_minute: i32) -> Result<Duration, DbError> {
    let wait: f64 = col(
        &one(pool, TAKE_POLAR_SLOT, &[&per_minute]).await?,
        "wait_seconds",
    )?;
    Ok(Duration::from_secs_f64(wait.clamp(0.0, 3600.0)))
}

/// No sidecar calls Polar before `wait` from now.
pub async fn pause_polar(pool: &Pool, wait: Duration) -> Result<(), DbError> {
    one(pool, PAUSE_POLAR, &[&interval(wait)]).await?;
    Ok(())
}

pub async fn polar_unavailable(pool: &Pool, cause: &str, detail: &Value) -> Result<(), DbError> {
    one(pool, POLAR_UNAVAILABLE, &[&cause, detail]).await?;
    Ok(())
}

pub async fn polar_available(pool: &Pool) -> Result<(), DbError> {
    one(pool, POLAR_AVAILABLE, &[]).await?;
    Ok(())
}
