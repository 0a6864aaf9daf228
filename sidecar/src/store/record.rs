//! Recording events and admitting keys.
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio_postgres::types::Json;
use uuid::Uuid;

use super::{col, rows, DbError};

const RECORD_EVENTS: &str =
    "SELECT idx, status, event_id, sqlstate, message FROM meter.record_events($1::text, $2::jsonb)";
const VERIFY_API_KEY: &str = "SELECT organization_id FROM meter.verify_api_key($1::text, $2::text)";

/// One item's answer from meter.record_events: an event id (recorded or
/// already recorded), or the item's SQLSTATE and message.
#[derive(Debug)]
pub struct ItemResult {
    pub status: String,
    pub event_id: Option<Uuid>,
    pub sqlstate: Option<String>,
    pub message: Option<String>,
}

/// meter.record_events: one result per event, in order.
pub async fn record_events(
    pool: &Pool,
    key: &str,
    events: &[Value],
) -> Result<Vec<ItemResult>, DbError> {
    // Json serialises the borrowed events: no copy of a batch is made.
    let rows = rows(pool, RECORD_EVENTS, &[&key, &Json(events)]).await?;
    if rows.len() != events.len() {
        return Err(DbError::Internal(format!(
            "record_events answered {} rows for {} events",
            rows.len(),
            events.len()
        )));
    }
    rows.iter()
        .map(|r| {
            Ok(ItemResult {
                status: col(r, "status")?,
                event_id: col(r, "event_id")?,
                sqlstate: col(r, "sqlstate")?,
                message: col(r, "message")?,
            })
        })
        .collect()
}

/// meter.verify_api_key: Ok when the key is good and holds `permission`.
pub async fn verify_api_key(pool: &Pool, key: &str, permission: &str) -> Result<(), DbError> {
    rows(pool, VERIFY_API_KEY, &[&key, &permission]).await?;
    Ok(())
}
