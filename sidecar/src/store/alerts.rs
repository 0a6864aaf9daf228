//! Alerts to forward to the webhook, and the outcome of each.
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde_json::Value;

use super::{col, one, rows, DbError};

const CLAIM_ALERTS: &str =
    "SELECT organization_id, alert_id, kind, dedup_key, raised_at, detail, attempts \
     FROM meter.claim_alerts(100, '1 minute')";
const ALERT_FORWARDED: &str = "SELECT meter.alert_forwarded($1, $2) AS done";
const ALERT_FORWARD_FAILED: &str = "SELECT meter.alert_forward_failed($1, $2, $3) AS status";

#[derive(Debug, Clone)]
pub struct Alert {
    pub organization_id: String,
    pub alert_id: i64,
    pub kind: String,
    pub dedup_key: String,
    pub raised_at: DateTime<Utc>,
    pub detail: Value,
    pub attempts: i32,
}

/// Up to 100 due alerts, each leased for a minute.
pub async fn claim_alerts(pool: &Pool) -> Result<Vec<Alert>, DbError> {
    rows(pool, CLAIM_ALERTS, &[])
        .await?
        .iter()
        .map(|r| {
            Ok(Alert {
                organization_id: col(r, "organization_id")?,
                alert_id: col(r, "alert_id")?,
                kind: col(r, "kind")?,
                dedup_key: col(r, "dedup_key")?,
                raised_at: col(r, "raised_at")?,
                detail: col(r, "detail")?,
                attempts: col(r, "attempts")?,
            })
        })
        .collect()
}

pub async fn alert_forwarded(pool: &Pool, a: &Alert) -> Result<(), DbError> {
    one(pool, ALERT_FORWARDED, &[&a.organization_id, &a.alert_id]).await?;
    Ok(())
}

/// Returns the alert's status after the failure (failed for good, or due again).
pub async fn alert_forward_failed(
    pool: &Pool,
    a: &Alert,
    error: &str,
) -> Result<Option<String>, DbError> {
    col(
        &one(
            pool,
            ALERT_FORWARD_FAILED,
            &[&a.organization_id, &a.alert_id, &error],
        )
        .await?,
        "status",
    )
}
