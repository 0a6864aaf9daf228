//! Organizations' Polar customers: what to create or update, and the outcome.
use deadpool_postgres::Pool;
use std::time::Duration;

use super::{col, interval, one, rows, DbError};

const CLAIM_PROVISIONING: &str =
    "SELECT org_id, action, polar_customer_id, name, email, owner_email, owner_name, owner_external_id, \
            customer_version \
     FROM meter.claim_provisioning($1, $2::text::interval)";
const CUSTOMER_PROVISIONED: &str = "SELECT meter.customer_provisioned($1, $2) AS done";
const CUSTOMER_SYNCED: &str = "SELECT meter.customer_synced($1, $2) AS done";
const PROVISIONING_FAILED: &str = "SELECT meter.provisioning_failed($1, $2) AS next_try";
const BACKFILL_POLAR_CUSTOMERS: &str = "SELECT meter.backfill_polar_customers() AS queued";

/// An organization whose customer must be created (`update` false) or
/// brought up to date.
#[derive(Debug, Clone)]
pub struct Provisioning {
    pub org_id: String,
    pub update: bool,
    pub polar_customer_id: Option<String>,
    pub name: String,
    pub email: Option<String>,
    pub owner_email: Option<String>,
    pub owner_name: Option<String>,
    pub owner_external_id: Option<String>,
    pub customer_version: i32,
}

pub async fn claim_provisioning(
    pool: &Pool,
    max: i32,
    lease: Duration,
) -> Result<Vec<Provisioning>, DbError> {
    rows(pool, CLAIM_PROVISIONING, &[&max, &interval(lease)])
        .await?
        .iter()
        .map(|r| {
            Ok(Provisioning {
                org_id: col(r, "org_id")?,
                update: col::<String>(r, "action")? == "update",
                polar_customer_id: col(r, "polar_customer_id")?,
                name: col(r, "name")?,
                email: col(r, "email")?,
                owner_email: col(r, "owner_email")?,
                owner_name: col(r, "owner_name")?,
                owner_external_id: col(r, "owner_external_id")?,
                customer_version: col(r, "customer_version")?,
            })
        })
        .collect()
}

pub async fn customer_provisioned(pool: &Pool, org: &str, customer: &str) -> Result<(), DbError> {
    one(pool, CUSTOMER_PROVISIONED, &[&org, &customer]).await?;
    Ok(())
}

pub async fn customer_synced(pool: &Pool, org: &str, version: i32) -> Result<(), DbError> {
    one(pool, CUSTOMER_SYNCED, &[&org, &version]).await?;
    Ok(())
}

pub async fn provisioning_failed(pool: &Pool, org: &str, error: &str) -> Result<(), DbError> {
    one(pool, PROVISIONING_FAILED, &[&org, &error]).await?;
    Ok(())
}

/// Queues every organization without a customer; returns how many.
pub async fn backfill_polar_customers(pool: &Pool) -> Result<i64, DbError> {
    col(&one(pool, BACKFILL_POLAR_CUSTOMERS, &[]).await?, "queued")
}
