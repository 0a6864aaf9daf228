//! The sidecar's one way into the database: a typed function per `meter.*`
//! function it calls, reading columns by name into structs. Nothing else in
//! the sidecar writes SQL text (a test greps for it), and what is called here
//! is exactly what the sidecar's role is granted (FUNCTIONS, checked against
//! the catalog by the e2e suite sql_privileges).
//!
//! One error policy: every failure is a [`DbError`] (a SQLSTATE the caller
//! maps, or the database being away); one retry policy: [`until_taken`] for
//! the reports that must not be lost.
pub mod alerts;
pub mod customers;
pub mod keys;
pub mod listen;
pub mod outbox;
pub mod polar_state;
pub mod reconcile;
pub mod record;
pub mod stats;

use deadpool_postgres::Pool;
use std::time::Duration;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::Row;

pub use crate::db::DbError;

/// Every `meter.*` function this sidecar calls, as PostgreSQL prints a
/// regprocedure. Granted to polar_meter_sidecar, with DEPRECATED and nothing else.
pub const FUNCTIONS: &[&str] = &[
    // recording and keys (store::record, store::keys)
    "meter.record_events(text,jsonb)",
    "meter.verify_api_key(text,text)",
    "meter.create_own_api_key(text,text,text[],timestamp with time zone)",
    "meter.list_own_api_keys(text)",
    "meter.revoke_own_api_key(text,uuid)",
    "meter.extension_version()",
    "meter.oldest_supported_sidecar()",
    "meter.outbox_stats()",
    // delivery (store::outbox, store::polar_state)
    "meter.due_organizations(integer)",
    "meter.claim_delivery(text,integer,interval)",
    "meter.delivery_sent(text,uuid,uuid[])",
    "meter.delivery_deferred(text,uuid,uuid[],interval)",
    "meter.delivery_failed(text,uuid,uuid[],text)",
    "meter.delivery_unconfirmed(text,uuid,uuid[],text)",
    "meter.delivery_rejected(text,uuid,uuid[],text)",
    "meter.delivery_too_early(text,uuid,uuid[],text)",
    "meter.take_polar_slot(integer)",
    "meter.pause_polar(interval)",
    "meter.polar_unavailable(text,jsonb)",
    "meter.polar_available()",
    // customers (store::customers)
    "meter.claim_provisioning(integer,interval)",
    "meter.customer_provisioned(text,text)",
    "meter.customer_synced(text,integer)",
    "meter.provisioning_failed(text,text)",
    "meter.backfill_polar_customers()",
    // reconciliation (store::reconcile)
    "meter.reconcile_meter_to_polar(timestamp with time zone,interval,text)",
    "meter.claim_reconcile_run(interval,bigint)",
    "meter.reconcile_count_plan(bigint,interval)",
    "meter.reconcile_add_counts(bigint,jsonb,interval)",
    "meter.reconcile_list_plan(bigint,interval)",
    "meter.reconcile_add_listed(bigint,text,text,integer,text[],text[],uuid[],text[],timestamp with time zone[],interval)",
    "meter.reconcile_finish(bigint)",
    "meter.reconcile_failed(bigint,text)",
    // alerts (store::alerts)
    "meter.claim_alerts(integer,interval)",
    "meter.alert_forwarded(text,bigint)",
    "meter.alert_forward_failed(text,bigint,text)",
];

/// Granted to polar_meter_sidecar for 0.3 sidecars during a rolling upgrade
/// (extension first, then sidecars) and never called by this one: their
/// replacements keep Polar's format out of the extension. Removed in 0.5.0.
pub const DEPRECATED: &[&str] = &[
    "meter.claim_events(text,integer,interval)",
    "meter.reconcile_add_remote(bigint,text,text,integer,jsonb,interval)",
];

/// One statement on a pooled connection (a bounded wait for it), prepared
/// once per connection.
async fn rows(
    pool: &Pool,
    sql: &'static str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, DbError> {
    let c = pool.get().await?;
    let stmt = c.prepare_cached(sql).await?;
    Ok(c.query(&stmt, params).await?)
}

/// A statement that answers exactly one row.
async fn one(
    pool: &Pool,
    sql: &'static str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Row, DbError> {
    rows(pool, sql, params)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| DbError::Internal(format!("no row from {sql}")))
}

/// A column by name: a missing or retyped column is the extension and the
/// sidecar disagreeing, never a client's mistake.
fn col<'a, T: FromSql<'a>>(row: &'a Row, name: &str) -> Result<T, DbError> {
    row.try_get(name)
        .map_err(|e| DbError::Internal(format!("column {name}: {e}")))
}

/// An interval parameter, as text PostgreSQL casts (`$n::text::interval`).
fn interval(d: Duration) -> String {
    format!("{} seconds", d.as_secs_f64())
}

/// Runs one report until the database takes it: a lease keeps others off
/// the rows meanwhile, so a blip must not lose an outcome. Only the database
/// being away is retried (20 times, 250 ms more each time); a refusal is final.
pub async fn until_taken<T, F, Fut>(what: &str, mut f: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut tries = 0u32;
    loop {
        match f().await {
            Err(DbError::Unavailable(e)) if tries < 20 => {
                tries += 1;
                tracing::warn!(error = %e, what, "reporting to the database failed; retrying");
                tokio::time::sleep(Duration::from_millis(250 * u64::from(tries))).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((p.clone(), std::fs::read_to_string(&p).unwrap()));
            }
        }
    }

    /// Code lines only: comments may name SQL functions.
    fn code(text: &str) -> String {
        text.lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn no_sql_text_outside_the_store() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let store = src.join("store");
        // Statements, and the client calls that run them.
        let patterns = [
            "\"SELECT ",
            "\"LISTEN ",
            "prepare_cached(",
            "batch_execute(",
            "simple_query(",
            "query_one(",
            "query_opt(",
            "c.query(",
            ".execute(",
        ];
        // A schema-qualified name (meter.x), not a word ending in meter.
        let qualified = |line: &str| {
            line.match_indices("meter.").any(|(i, _)| {
                !line[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
        };
        let mut found = Vec::new();
        for (path, text) in &files {
            if path.starts_with(&store) {
                continue;
            }
            for (n, line) in code(text).lines().enumerate() {
                if qualified(line) || patterns.iter().any(|p| line.contains(p)) {
                    found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
        assert!(
            found.is_empty(),
            "SQL outside sidecar/src/store:\n{}",
            found.join("\n")
        );
    }

    #[test]
    fn every_function_called_is_listed_and_every_listed_one_is_called() {
        let store = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store");
        let mut files = Vec::new();
        sources(&store, &mut files);
        let called: std::collections::BTreeSet<String> = files
            .iter()
            .filter(|(p, _)| !p.ends_with("mod.rs"))
            .flat_map(|(_, t)| {
                let t = code(t);
                t.match_indices("meter.")
                    .map(|(i, _)| {
                        t[i..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
                            .collect::<String>()
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let listed: std::collections::BTreeSet<String> = FUNCTIONS
            .iter()
            .map(|f| f.split('(').next().unwrap().to_string())
            .collect();
        assert_eq!(called, listed);
        for d in DEPRECATED {
            assert!(
                !called.contains(d.split('(').next().unwrap()),
                "{d} is called"
            );
        }
    }
}
