//! The outbox's figures for /metrics, read from the database on a timer so
//! that a scrape never costs a query.
use std::sync::Arc;
use tokio::sync::watch;

use super::Jobs;
use crate::store::stats::outbox_stats;

pub async fn run(jobs: Arc<Jobs>, mut stop: watch::Receiver<bool>) {
    loop {
        match outbox_stats(&jobs.pool).await {
            Ok(s) => jobs.metrics.set_outbox(s),
            Err(e) => tracing::debug!(error = %e, "reading outbox statistics failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(jobs.s.stats) => {}
            _ = stop.changed() => return,
        }
    }
}
