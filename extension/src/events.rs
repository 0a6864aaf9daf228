//! Event rules (polar_meter_rules::{batch, validate, ids}), exposed to the
//! set-based recording in events.sql: the batch is checked here in one pass,
//! every timestamp is parsed here once, and SQL only touches rows.
use pgrx::prelude::*;
use pgrx::JsonB;
use polar_meter_rules::{batch, ids, validate};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub(crate) const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

pub(crate) fn unix_us(t: TimestampWithTimeZone) -> i64 {
    i64::from(t).saturating_add(PG_EPOCH_UNIX_US)
}

/// NULL when `events` is an array of 1 to 1000 items, else the violation.
#[pg_extern(immutable, parallel_safe)]
fn _batch_violation(events: Option<JsonB>) -> Option<Vec<String>> {
    let v = events.map(|j| j.0).unwrap_or(serde_json::Value::Null);
    crate::errors::check(batch::envelope(&v).map(|_| ()))
}

/// Every item of a batch, checked: its fields, or its violation. `now` and
/// `max_skew_us` bound the timestamp (passed in, so the function stays immutable).
// pgrx reads the column names from this signature, so it cannot be an alias.
#[allow(clippy::type_complexity)]
#[pg_extern(immutable, parallel_safe)]
fn _check_events(
    events: Option<JsonB>,
    now: TimestampWithTimeZone,
    max_skew_us: i64,
) -> TableIterator<
    'static,
    (
        name!(idx, i32),
        name!(idempotency_key, Option<String>),
        name!(event_name, Option<String>),
        name!(event_timestamp, Option<TimestampWithTimeZone>),
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    let v = events.map(|j| j.0).unwrap_or(serde_json::Value::Null);
    let rows: Vec<_> = batch::check_events(&v, unix_us(now), max_skew_us)
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let ts = c
                .timestamp_us
                .and_then(|us| TimestampWithTimeZone::try_from(us - PG_EPOCH_UNIX_US).ok());
            let (code, message) = match c.violation {
                Some(v) => (Some(v.sqlstate.to_string()), Some(v.message)),
                None => (None, None),
            };
            (i as i32, c.idempotency_key, c.event_name, ts, code, message)
        })
        .collect();
    TableIterator::new(rows)
}

/// See polar_meter_rules::ids::payload_fingerprint; `metadata` is jsonb's
/// canonical text, so any spelling of the same payload has one fingerprint.
#[pg_extern(immutable, strict, parallel_safe)]
fn _payload_hash(
    event_name: &str,
    event_timestamp: TimestampWithTimeZone,
    metadata: &str,
) -> Vec<u8> {
    ids::payload_fingerprint(event_name, unix_us(event_timestamp), metadata).to_vec()
}

/// See polar_meter_rules::ids::external_id.
#[pg_extern(immutable, strict, parallel_safe)]
fn _external_id(organization_id: &str, idempotency_key: &str) -> String {
    ids::external_id(organization_id, idempotency_key)
}

/// The metadata key delivery adds (clients may not use it).
#[pg_extern(immutable, parallel_safe)]
fn _reserved_metadata_key() -> &'static str {
    validate::RESERVED_METADATA_KEY
}
