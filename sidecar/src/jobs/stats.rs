//! The outbox's figures for /metrics, read from the database on a timer so
//! that a scrape never costs a query.
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::watch;

use super::Jobs;

pub async fn run(jobs: Arc<Jobs>, mut stop: watch::Receiver<bool>) {
    loop {
        match jobs.pool.get().await {
            Ok(c) => match c.query_one("SELECT meter.outbox_stats()", &[]).await {
                Ok(row) => jobs.metrics.set_outbox(row.get::<_, Value>(0)),
                Err(e) => {
                    tracing::debug!(error = %crate::db::DbError::from(e), "reading outbox statistics failed")
                }
            },
            Err(e) => {
                tracing::debug!(error = %crate::db::DbError::from(e), "reading outbox statistics failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(jobs.s.stats) => {}
            _ = stop.changed() => return,
        }
    }
}
