//! Entry points of earlier releases, kept in the library but not in 0.3's SQL.
//! After a package upgrade, a database still on an older catalog calls these
//! until `ALTER EXTENSION polar_meter UPDATE` runs (upgrade notes); removing
//! one would break that window. sql_upgrade.rs creates 0.2.0 on this library
//! and records events through them.
use pgrx::prelude::*;
use pgrx::JsonB;
use polar_meter_rules::{sqlstate, validate, Violation};

fn required<'a>(field: &str, v: Option<&'a str>, code: &'static str) -> Result<&'a str, Violation> {
    v.ok_or_else(|| Violation::new(code, format!("{field} is required")))
}

/// 0.2.0's single-event check (its `meter._event_violation`).
#[pg_extern(immutable, parallel_safe, sql = false)]
fn _event_violation(
    idempotency_key: Option<&str>,
    event_name: Option<&str>,
    event_timestamp: Option<TimestampWithTimeZone>,
    metadata: Option<&str>,
    now: TimestampWithTimeZone,
    max_skew_us: i64,
) -> Option<Vec<String>> {
    let r = (|| {
        validate::idempotency_key(required(
            "idempotency_key",
            idempotency_key,
            sqlstate::IDEMPOTENCY_KEY,
        )?)?;
        validate::event_name(required("event_name", event_name, sqlstate::EVENT_NAME)?)?;
        let ts = event_timestamp.ok_or_else(|| {
            Violation::new(sqlstate::EVENT_TIMESTAMP, "event_timestamp is required")
        })?;
        validate::event_timestamp_bounds(
            crate::events::unix_us(ts),
            crate::events::unix_us(now),
            max_skew_us,
        )?;
        let meta: serde_json::Value = match metadata {
            None => serde_json::Value::Object(Default::default()),
            Some(text) => serde_json::from_str(text).map_err(|e| {
                Violation::new(
                    sqlstate::EVENT_METADATA,
                    format!("metadata is not valid JSON: {e}"),
                )
            })?,
        };
        validate::metadata(&meta)
    })();
    crate::errors::check(r)
}

/// 0.2.0's `meter._timestamp_text_violation`.
#[pg_extern(immutable, parallel_safe, sql = false)]
fn _timestamp_text_violation(text: Option<&str>) -> Option<Vec<String>> {
    let Some(text) = text else {
        return Some(crate::errors::violation(Violation::new(
            sqlstate::EVENT_TIMESTAMP,
            "event_timestamp is required",
        )));
    };
    crate::errors::check(validate::event_timestamp_text(text).map(|_| ()))
}

/// 0.2.0's `meter._compute_drift`: `{"ok": drift}` or `{"error": message}`.
#[pg_extern(immutable, strict, parallel_safe, sql = false)]
fn _compute_drift(local: JsonB, remote: JsonB) -> JsonB {
    JsonB(
        match polar_meter_rules::drift::compute(&local.0, &remote.0) {
            Ok(v) => serde_json::json!({ "ok": v }),
            Err(e) => {
                serde_json::json!({ "error": e.message.trim_start_matches("compute_drift: ") })
            }
        },
    )
}

/// 0.1/0.2's `meter._payload_hash` (0.3 fingerprints in `_prepare_batch`).
#[pg_extern(immutable, strict, parallel_safe, sql = false)]
fn _payload_hash(
    event_name: &str,
    event_timestamp: TimestampWithTimeZone,
    metadata: &str,
) -> Vec<u8> {
    polar_meter_rules::ids::payload_fingerprint(
        event_name,
        crate::events::unix_us(event_timestamp),
        metadata,
    )
    .to_vec()
}

/// 0.1/0.2's `meter._external_id` (0.3 derives it in `_prepare_batch`).
#[pg_extern(immutable, strict, parallel_safe, sql = false)]
fn _external_id(organization_id: &str, idempotency_key: &str) -> String {
    polar_meter_rules::ids::external_id(organization_id, idempotency_key)
}
