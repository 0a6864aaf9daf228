//! One rate budget towards Polar for every sidecar of a database: each call
//! first reserves a slot in PostgreSQL (meter.take_polar_slot), so N sidecars
//! together stay under POLAR_RATE_LIMIT, and a 429's Retry-After holds them all.
use deadpool_postgres::Pool;
use std::time::Duration;

use crate::store::{polar_state, DbError};

pub struct Budget {
    pool: Pool,
    per_minute: i32,
}

impl Budget {
    pub fn new(pool: Pool, per_minute: u32) -> Self {
        Budget {
            pool,
            per_minute: per_minute.clamp(1, i32::MAX as u32) as i32,
        }
    }

    /// Waits for this sidecar's next slot.
    pub async fn acquire(&self) -> Result<(), DbError> {
        let wait = polar_state::take_polar_slot(&self.pool, self.per_minute).await?;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    /// No sidecar calls Polar before `wait` from now (a 429's Retry-After).
    pub async fn pause(&self, wait: Duration) -> Result<(), DbError> {
        polar_state::pause_polar(&self.pool, wait).await
    }
}
