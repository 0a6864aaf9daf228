//! Event rules (polar_meter_rules::{batch, validate, ids}), exposed to the
//! set-based recording in events.sql: the batch is checked, fingerprinted and
//! given its ids here in one pass, every timestamp is parsed here once, and
//! SQL only touches rows.
use pgrx::callconv::{Arg, ArgAbi};
use pgrx::nullable::Nullable;
use pgrx::prelude::*;
use polar_meter_rules::{batch, ids, validate};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub(crate) const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

pub(crate) fn unix_us(t: TimestampWithTimeZone) -> i64 {
    i64::from(t).saturating_add(PG_EPOCH_UNIX_US)
}

/// A `jsonb` batch argument, read by batch::parse rather than pgrx's JsonB:
/// JsonB's conversion fails the whole call (XX000) on nesting deeper than
/// serde_json's limit, where one deep item must fail alone.
pub(crate) struct BatchJson(serde_json::Value);

impl_sql_translatable!(BatchJson, arg_only = "jsonb");

impl FromDatum for BatchJson {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // jsonb_out detoasts, and writes valid JSON (UTF-8 in a UTF-8
        // database; pgrx's JsonB assumes the same).
        let text = unsafe {
            pgrx::direct_function_call::<&core::ffi::CStr>(pg_sys::jsonb_out, &[Some(datum)])
        }?;
        let parsed = text
            .to_str()
            .map_err(|e| e.to_string())
            .and_then(|t| batch::parse(t).map_err(|e| e.to_string()));
        Some(BatchJson(parsed.unwrap_or_else(|e| {
            error!("jsonb_out gave text serde_json cannot read: {e}")
        })))
    }
}

unsafe impl<'fcx> ArgAbi<'fcx> for BatchJson {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

/// A whole batch of one organization, prepared in one Rust pass
/// (polar_meter_rules::batch::prepare), as one row of arrays in request
/// order, so that SQL only inserts: the envelope's violation (and no items),
/// or each item's fields or violation, fingerprint, external_id, a fresh id,
/// and whether it is the first good item of its key; `valid` counts the
/// distinct keys of good items. `now` and `max_skew_us` bound the timestamps
/// (passed in, so the function stays immutable).
// pgrx reads the column names from this signature, so it cannot be an alias.
#[allow(clippy::type_complexity)]
#[pg_extern(immutable, parallel_safe)]
fn _prepare_batch(
    org_id: &str,
    events: Option<BatchJson>,
    now: TimestampWithTimeZone,
    max_skew_us: i64,
) -> TableIterator<
    'static,
    (
        name!(violation, Option<Vec<String>>),
        name!(idx, Vec<i32>),
        name!(keys, Vec<Option<String>>),
        name!(names, Vec<Option<String>>),
        name!(ts, Vec<Option<TimestampWithTimeZone>>),
        name!(codes, Vec<Option<String>>),
        name!(msgs, Vec<Option<String>>),
        name!(hashes, Vec<Option<Vec<u8>>>),
        name!(external_ids, Vec<Option<String>>),
        name!(ids, Vec<pgrx::Uuid>),
        name!(firsts, Vec<bool>),
        name!(valid, i32),
    ),
> {
    let v = events.map(|j| j.0).unwrap_or(serde_json::Value::Null);
    let items = match batch::prepare(org_id, &v, unix_us(now), max_skew_us) {
        Ok(items) => items,
        Err(violation) => {
            let none = Some(crate::errors::violation(violation));
            return TableIterator::new(vec![(
                none,
                vec![],
                vec![],
                vec![],
                vec![],
                vec![],
                vec![],
                vec![],
                vec![],
                vec![],
                vec![],
                0,
            )]);
        }
    };
    let ids = ids::event_ids(items.len(), unix_us(now).div_euclid(1000))
        .unwrap_or_else(|e| error!("no randomness for event ids: {e}"));
    let valid = items.iter().filter(|p| p.first_of_key).count() as i32;
    let mut row = (
        None,
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        valid,
    );
    for (i, (p, id)) in items.into_iter().zip(ids).enumerate() {
        let c = p.checked;
        let (code, message) = match c.violation {
            Some(v) => (Some(v.sqlstate.to_string()), Some(v.message)),
            None => (None, None),
        };
        row.1.push(i as i32);
        row.2.push(c.idempotency_key);
        row.3.push(c.event_name);
        row.4.push(
            c.timestamp_us
                .and_then(|us| TimestampWithTimeZone::try_from(us - PG_EPOCH_UNIX_US).ok()),
        );
        row.5.push(code);
        row.6.push(message);
        row.7.push(p.fingerprint.map(|f| f.to_vec()));
        row.8.push(p.external_id);
        row.9.push(pgrx::Uuid::from_bytes(id));
        row.10.push(p.first_of_key);
    }
    TableIterator::new(vec![row])
}

/// The metadata key delivery adds (clients may not use it).
#[pg_extern(immutable, parallel_safe)]
fn _reserved_metadata_key() -> &'static str {
    validate::RESERVED_METADATA_KEY
}
