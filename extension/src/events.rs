//! Event validation (the rules live in polar_meter_rules::validate, once);
//! recording and idempotency are SQL in events.sql.
use pgrx::prelude::*;
use polar_meter_rules::{sqlstate, validate, Violation};

pgrx::extension_sql_file!(
    "events.sql",
    name = "events",
    requires = [
        "keys",
        "audit",
        _event_violation,
        _timestamp_text_violation,
        _payload_hash,
        _external_id
    ]
);

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

fn required<'a>(field: &str, v: Option<&'a str>, code: &'static str) -> Result<&'a str, Violation> {
    v.ok_or_else(|| Violation::new(code, format!("{field} is required")))
}

fn check(
    idempotency_key: Option<&str>,
    event_name: Option<&str>,
    event_timestamp: Option<TimestampWithTimeZone>,
    metadata: Option<&str>,
    now: TimestampWithTimeZone,
    max_skew_us: i64,
) -> Result<(), Violation> {
    validate::idempotency_key(required(
        "idempotency_key",
        idempotency_key,
        sqlstate::IDEMPOTENCY_KEY,
    )?)?;
    validate::event_name(required("event_name", event_name, sqlstate::EVENT_NAME)?)?;
    let ts = event_timestamp
        .ok_or_else(|| Violation::new(sqlstate::EVENT_TIMESTAMP, "event_timestamp is required"))?;
    let unix = |t: TimestampWithTimeZone| i64::from(t).saturating_add(PG_EPOCH_UNIX_US);
    validate::event_timestamp_bounds(unix(ts), unix(now), max_skew_us)?;
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
}

/// NULL when the event may be recorded, else `{sqlstate, message}`.
/// `metadata` arrives as jsonb's text form so that any number jsonb holds
/// (1e400 included) is judged, never a parse panic.
#[pg_extern(immutable, parallel_safe)]
fn _event_violation(
    idempotency_key: Option<&str>,
    event_name: Option<&str>,
    event_timestamp: Option<TimestampWithTimeZone>,
    metadata: Option<&str>,
    now: TimestampWithTimeZone,
    max_skew_us: i64,
) -> Option<Vec<String>> {
    check(
        idempotency_key,
        event_name,
        event_timestamp,
        metadata,
        now,
        max_skew_us,
    )
    .err()
    .map(crate::violation)
}

/// NULL when `text` is an RFC 3339 timestamp with a zone, else the violation.
#[pg_extern(immutable, parallel_safe)]
fn _timestamp_text_violation(text: Option<&str>) -> Option<Vec<String>> {
    let Some(text) = text else {
        return Some(crate::violation(Violation::new(
            sqlstate::EVENT_TIMESTAMP,
            "event_timestamp is required",
        )));
    };
    validate::event_timestamp_text(text)
        .err()
        .map(crate::violation)
}

/// See polar_meter_rules::ids::payload_fingerprint; `metadata` is jsonb's
/// canonical text, the same text `_event_violation` judged.
#[pg_extern(immutable, strict, parallel_safe)]
fn _payload_hash(
    event_name: &str,
    event_timestamp: TimestampWithTimeZone,
    metadata: &str,
) -> Vec<u8> {
    let unix = i64::from(event_timestamp).saturating_add(PG_EPOCH_UNIX_US);
    polar_meter_rules::ids::payload_fingerprint(event_name, unix, metadata).to_vec()
}

/// See polar_meter_rules::ids::external_id.
#[pg_extern(immutable, strict, parallel_safe)]
fn _external_id(organization_id: &str, idempotency_key: &str) -> String {
    polar_meter_rules::ids::external_id(organization_id, idempotency_key)
}
