//! Reconcile runs: opening, claiming, the plans, handing Polar's answers
//! back (as typed rows: Polar's format stops in crate::polar), the verdict.
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

use super::{col, interval, one, rows, DbError};

const RECONCILE_METER_TO_POLAR: &str =
    "SELECT meter.reconcile_meter_to_polar($1, $2::text::interval, $3) AS run_id";
const CLAIM_RECONCILE_RUN: &str = "SELECT run_id, window_start, window_end, pages_done, mode \
     FROM meter.claim_reconcile_run($1::text::interval, $2)";
const RECONCILE_COUNT_PLAN: &str =
    "SELECT organization_id, event_name, remote FROM meter.reconcile_count_plan($1)";
const RECONCILE_ADD_COUNTS: &str = "SELECT meter.reconcile_add_counts($1, $2) AS added";
const RECONCILE_LIST_PLAN: &str =
    "SELECT organization_id, event_name, pages_done FROM meter.reconcile_list_plan($1)";
const RECONCILE_ADD_LISTED: &str =
    "SELECT meter.reconcile_add_listed($1, $2, $3, $4, $5, $6, $7, $8, $9) AS added";
const RECONCILE_FINISH: &str = "SELECT meter.reconcile_finish($1) AS result";
const RECONCILE_FAILED: &str = "SELECT meter.reconcile_failed($1, $2) AS status";

/// A run claimed under a lease.
pub struct Run {
    pub id: i64,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    /// counts (per pair, listing only where they differ) or full.
    pub mode: String,
}

/// A (customer, event name) pair of a counts run; `remote` once counted.
pub struct Pair {
    pub organization_id: Option<String>,
    pub event_name: Option<String>,
    pub remote: Option<i64>,
}

/// What to list: one pair, or (NULL, NULL) the whole window.
pub struct Listing {
    pub organization_id: Option<String>,
    pub event_name: Option<String>,
    pub pages_done: i32,
}

/// One event as Polar lists it, in our terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub polar_id: String,
    /// The customer's external id: our organization id.
    pub customer: String,
    /// Our event id, as delivery put it into the event's metadata.
    pub event_id: Option<Uuid>,
    pub name: String,
    pub timestamp: DateTime<Utc>,
}

/// Opens a run over [end - length, end) (end NULL: the latest closed window).
pub async fn reconcile_meter_to_polar(
    pool: &Pool,
    end: Option<DateTime<Utc>>,
    length: Duration,
    mode: Option<&str>,
) -> Result<i64, DbError> {
    col(
        &one(
            pool,
            RECONCILE_METER_TO_POLAR,
            &[&end, &interval(length), &mode],
        )
        .await?,
        "run_id",
    )
}

pub async fn claim_reconcile_run(
    pool: &Pool,
    lease: Duration,
    only: Option<i64>,
) -> Result<Option<Run>, DbError> {
    let rows = rows(pool, CLAIM_RECONCILE_RUN, &[&interval(lease), &only]).await?;
    let Some(r) = rows.first() else {
        return Ok(None);
    };
    Ok(Some(Run {
        id: col(r, "run_id")?,
        window_start: col(r, "window_start")?,
        window_end: col(r, "window_end")?,
        mode: col(r, "mode")?,
    }))
}

pub async fn reconcile_count_plan(pool: &Pool, run: i64) -> Result<Vec<Pair>, DbError> {
    rows(pool, RECONCILE_COUNT_PLAN, &[&run])
        .await?
        .iter()
        .map(|r| {
            Ok(Pair {
                organization_id: col(r, "organization_id")?,
                event_name: col(r, "event_name")?,
                remote: col(r, "remote")?,
            })
        })
        .collect()
}

/// Polar's counts for some pairs.
pub async fn reconcile_add_counts(pool: &Pool, run: i64, counted: &[Pair]) -> Result<(), DbError> {
    let counts: Vec<Value> = counted
        .iter()
        .map(|p| json!({"organization_id": p.organization_id, "event_name": p.event_name, "remote": p.remote}))
        .collect();
    one(pool, RECONCILE_ADD_COUNTS, &[&run, &Value::Array(counts)]).await?;
    Ok(())
}

pub async fn reconcile_list_plan(pool: &Pool, run: i64) -> Result<Vec<Listing>, DbError> {
    rows(pool, RECONCILE_LIST_PLAN, &[&run])
        .await?
        .iter()
        .map(|r| {
            Ok(Listing {
                organization_id: col(r, "organization_id")?,
                event_name: col(r, "event_name")?,
                pages_done: col(r, "pages_done")?,
            })
        })
        .collect()
}

/// One page of Polar's listing for `listing`, recorded as page `page`.
pub async fn reconcile_add_listed(
    pool: &Pool,
    run: i64,
    listing: (&Option<String>, &Option<String>),
    page: i32,
    events: &[Listed],
) -> Result<i32, DbError> {
    let polar_ids: Vec<&str> = events.iter().map(|e| e.polar_id.as_str()).collect();
    let customers: Vec<&str> = events.iter().map(|e| e.customer.as_str()).collect();
    let event_ids: Vec<Option<Uuid>> = events.iter().map(|e| e.event_id).collect();
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    let timestamps: Vec<DateTime<Utc>> = events.iter().map(|e| e.timestamp).collect();
    let r = one(
        pool,
        RECONCILE_ADD_LISTED,
        &[
            &run,
            listing.0,
            listing.1,
            &page,
            &polar_ids,
            &customers,
            &event_ids,
            &names,
            &timestamps,
        ],
    )
    .await?;
    col(&r, "added")
}

/// The verdict (README, "Reconciliation"), as JSON for the operator.
pub async fn reconcile_finish(pool: &Pool, run: i64) -> Result<Value, DbError> {
    col(&one(pool, RECONCILE_FINISH, &[&run]).await?, "result")
}

/// Returns the run's status after the failed try.
pub async fn reconcile_failed(
    pool: &Pool,
    run: i64,
    error: &str,
) -> Result<Option<String>, DbError> {
    col(
        &one(pool, RECONCILE_FAILED, &[&run, &error]).await?,
        "status",
    )
}
