//! meter.outbox_stats(), read into a struct whose fields are exactly the
//! function's keys: a key renamed in the extension fails to parse (and the
//! e2e suite metrics checks the two against each other), never reads as 0.
use deadpool_postgres::Pool;
use serde::Deserialize;
use serde_json::Value;

use super::{col, one, DbError};

const OUTBOX_STATS: &str = "SELECT meter.outbox_stats() AS stats";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxStats {
    pub backlog: Backlog,
    pub oldest_due_age_seconds: f64,
    pub waiting_for_customer: i64,
    pub alerts_pending: i64,
    pub alerts_failed: i64,
    pub alerts_total: i64,
    pub audit_unsealed: i64,
    pub last_reconcile: Option<LastReconcile>,
    pub reconcile_failed: i64,
}

/// Events by delivery status; a status with none is absent from the JSON.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backlog {
    pub pending: i64,
    pub in_flight: i64,
    pub failed: i64,
    pub dropped: i64,
    pub rejected: i64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastReconcile {
    pub run_id: i64,
    pub finished_at: String,
    pub window_end: String,
    pub age_seconds: f64,
    pub drift: Option<i64>,
    pub drift_ratio: Option<f64>,
    pub mode: String,
}

impl OutboxStats {
    pub fn parse(v: Value) -> Result<Self, DbError> {
        serde_json::from_value(v)
            .map_err(|e| DbError::Internal(format!("meter.outbox_stats(): {e}")))
    }
}

pub async fn outbox_stats(pool: &Pool) -> Result<OutboxStats, DbError> {
    OutboxStats::parse(col(&one(pool, OUTBOX_STATS, &[]).await?, "stats")?)
}
