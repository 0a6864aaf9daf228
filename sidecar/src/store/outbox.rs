//! Delivery: which organizations are due, claims, and each outcome's report.
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

use super::{col, interval, one, rows, DbError};

const DUE_ORGANIZATIONS: &str = "SELECT organization_id FROM meter.due_organizations($1)";
const CLAIM_DELIVERY: &str =
    "SELECT batch_id, event_id, event_name, event_timestamp, external_id, metadata \
     FROM meter.claim_delivery($1, $2, $3::text::interval)";
const DELIVERY_SENT: &str = "SELECT meter.delivery_sent($1, $2, $3) AS n";
const DELIVERY_DEFERRED: &str =
    "SELECT meter.delivery_deferred($1, $2, $3, $4::text::interval) AS n";
const DELIVERY_FAILED: &str = "SELECT failed, dropped FROM meter.delivery_failed($1, $2, $3, $4)";
const DELIVERY_UNCONFIRMED: &str =
    "SELECT failed, dropped FROM meter.delivery_unconfirmed($1, $2, $3, $4)";
const DELIVERY_REJECTED: &str = "SELECT meter.delivery_rejected($1, $2, $3, $4) AS n";
const DELIVERY_TOO_EARLY: &str = "SELECT meter.delivery_too_early($1, $2, $3, $4) AS n";

/// An event as stored, claimed for delivery; crate::polar::events turns it
/// into Polar's format.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub event_id: Uuid,
    pub event_name: String,
    pub event_timestamp: DateTime<Utc>,
    pub external_id: String,
    pub metadata: Value,
}

/// One claim: the batch's id (its reports name it) and its events.
pub struct Claim {
    pub batch_id: Uuid,
    pub events: Vec<Claimed>,
}

/// What a failure report did: events still held by the batch that counted
/// an attempt, and how many of them were dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Failed {
    pub failed: i32,
    pub dropped: i32,
}

pub async fn due_organizations(pool: &Pool, max: i32) -> Result<Vec<String>, DbError> {
    rows(pool, DUE_ORGANIZATIONS, &[&max])
        .await?
        .iter()
        .map(|r| col(r, "organization_id"))
        .collect()
}

/// None when nothing of the organization is due.
pub async fn claim_delivery(
    pool: &Pool,
    org: &str,
    max: i32,
    lease: Duration,
) -> Result<Option<Claim>, DbError> {
    let rows = rows(pool, CLAIM_DELIVERY, &[&org, &max, &interval(lease)]).await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let batch_id = col(first, "batch_id")?;
    let events = rows
        .iter()
        .map(|r| {
            Ok(Claimed {
                event_id: col(r, "event_id")?,
                event_name: col(r, "event_name")?,
                event_timestamp: col(r, "event_timestamp")?,
                external_id: col(r, "external_id")?,
                metadata: col(r, "metadata")?,
            })
        })
        .collect::<Result<_, DbError>>()?;
    Ok(Some(Claim { batch_id, events }))
}

/// The rows a report names: an organization, its batch, some of its events.
#[derive(Clone, Copy)]
pub struct Held<'a> {
    pub org: &'a str,
    pub batch: Uuid,
    pub ids: &'a [Uuid],
}

async fn count(
    pool: &Pool,
    sql: &'static str,
    h: Held<'_>,
    arg: Option<&str>,
) -> Result<i32, DbError> {
    let r = match arg {
        Some(a) => one(pool, sql, &[&h.org, &h.batch, &h.ids, &a]).await?,
        None => one(pool, sql, &[&h.org, &h.batch, &h.ids]).await?,
    };
    col(&r, "n")
}

async fn failure(
    pool: &Pool,
    sql: &'static str,
    h: Held<'_>,
    error: &str,
) -> Result<Failed, DbError> {
    let r = one(pool, sql, &[&h.org, &h.batch, &h.ids, &error]).await?;
    Ok(Failed {
        failed: col(&r, "failed")?,
        dropped: col(&r, "dropped")?,
    })
}

pub async fn delivery_sent(pool: &Pool, h: Held<'_>) -> Result<i32, DbError> {
    count(pool, DELIVERY_SENT, h, None).await
}

pub async fn delivery_deferred(pool: &Pool, h: Held<'_>, wait: Duration) -> Result<i32, DbError> {
    count(pool, DELIVERY_DEFERRED, h, Some(&interval(wait))).await
}

pub async fn delivery_rejected(pool: &Pool, h: Held<'_>, error: &str) -> Result<i32, DbError> {
    count(pool, DELIVERY_REJECTED, h, Some(error)).await
}

pub async fn delivery_too_early(pool: &Pool, h: Held<'_>, error: &str) -> Result<i32, DbError> {
    count(pool, DELIVERY_TOO_EARLY, h, Some(error)).await
}

pub async fn delivery_failed(pool: &Pool, h: Held<'_>, error: &str) -> Result<Failed, DbError> {
    failure(pool, DELIVERY_FAILED, h, error).await
}

pub async fn delivery_unconfirmed(
    pool: &Pool,
    h: Held<'_>,
    detail: &str,
) -> Result<Failed, DbError> {
    failure(pool, DELIVERY_UNCONFIRMED, h, detail).await
}
