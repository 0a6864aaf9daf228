//! One rate budget towards Polar for every sidecar of a database: each call
//! first reserves a slot in PostgreSQL (meter.take_polar_slot), so N sidecars
//! together stay under POLAR_RATE_LIMIT, and a 429's Retry-After holds them all.
use deadpool_postgres::Pool;
use std::time::Duration;

use crate::db::DbError;

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
        let wait: f64 = {
            let c = self.pool.get().await?;
            c.query_one("SELECT meter.take_polar_slot($1)", &[&self.per_minute])
                .await?
                .get(0)
        };
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait.min(3600.0))).await;
        }
        Ok(())
    }

    /// No sidecar calls Polar before `wait` from now (a 429's Retry-After).
    pub async fn pause(&self, wait: Duration) -> Result<(), DbError> {
        let secs = format!("{} seconds", wait.as_secs_f64());
        let c = self.pool.get().await?;
        c.query_one("SELECT meter.pause_polar($1::text::interval)", &[&secs])
            .await?;
        Ok(())
    }
}
