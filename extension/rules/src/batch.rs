//! A batch of events, as set-based recording receives it: a JSON array of up
//! to 1000 objects `{idempotency_key, event_name, event_timestamp, metadata?}`.
//! The envelope is judged whole (a bad one refuses the call); each item is
//! judged alone, so one bad item never blocks its neighbours. Every rule an
//! item must satisfy is the single event's (validate.rs): a batch of one is
//! exactly a single event.

use crate::sqlstate::{self, Violation};
use crate::{ids, validate};
use serde_json::Value;

pub const MAX_EVENTS: usize = 1000;
pub const FIELDS: [&str; 4] = [
    "idempotency_key",
    "event_name",
    "event_timestamp",
    "metadata",
];

/// One item after checking: its fields, or why it cannot be recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub idempotency_key: Option<String>,
    pub event_name: Option<String>,
    /// Microseconds since the Unix epoch.
    pub timestamp_us: Option<i64>,
    pub violation: Option<Violation>,
}

/// The envelope: an array of 1 to MAX_EVENTS items.
pub fn envelope(events: &Value) -> Result<usize, Violation> {
    match events.as_array() {
        Some(a) if !a.is_empty() && a.len() <= MAX_EVENTS => Ok(a.len()),
        Some(a) => Err(Violation::new(
            sqlstate::BATCH_ENVELOPE,
            format!(
                "events must hold 1 to {MAX_EVENTS} events (got {})",
                a.len()
            ),
        )),
        None => Err(Violation::new(
            sqlstate::BATCH_ENVELOPE,
            "events must be a JSON array",
        )),
    }
}

/// An item ready to insert: checked, and for a good item its fingerprint,
/// its external_id, and whether it is the first good item of its key (the
/// one a batch inserts; later ones are judged against it).
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub checked: Checked,
    pub fingerprint: Option<[u8; 32]>,
    pub external_id: Option<String>,
    pub first_of_key: bool,
}

/// The whole batch of an organization, prepared in one pass: the envelope's
/// violation, or every item in request order.
pub fn prepare(
    organization_id: &str,
    events: &Value,
    now_us: i64,
    skew_us: i64,
) -> Result<Vec<Prepared>, Violation> {
    envelope(events)?;
    let items = events.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    Ok(items
        .iter()
        .map(|v| {
            let checked = check_one(v, now_us, skew_us);
            let (fingerprint, external_id, first_of_key) =
                match (&checked.violation, &checked.idempotency_key) {
                    (None, Some(k)) => {
                        let empty = Value::Object(Default::default());
                        let metadata = v.get("metadata").unwrap_or(&empty);
                        let fp = ids::payload_fingerprint(
                            checked.event_name.as_deref().unwrap_or_default(),
                            checked.timestamp_us.unwrap_or_default(),
                            &ids::jsonb_text(metadata),
                        );
                        (
                            Some(fp),
                            Some(ids::external_id(organization_id, k)),
                            seen.insert(k.clone()),
                        )
                    }
                    _ => (None, None, false),
                };
            Prepared {
                checked,
                fingerprint,
                external_id,
                first_of_key,
            }
        })
        .collect())
}

/// Every item of a well-formed envelope, in order (an ill-formed one has none).
pub fn check_events(events: &Value, now_us: i64, skew_us: i64) -> Vec<Checked> {
    let Some(items) = events.as_array() else {
        return Vec::new();
    };
    items
        .iter()
        .map(|v| check_one(v, now_us, skew_us))
        .collect()
}

fn check_one(v: &Value, now_us: i64, skew_us: i64) -> Checked {
    let mut out = Checked {
        idempotency_key: None,
        event_name: None,
        timestamp_us: None,
        violation: None,
    };
    if let Err(e) = fill(&mut out, v, now_us, skew_us) {
        out.violation = Some(e);
    }
    out
}

fn text<'a>(
    obj: &'a serde_json::Map<String, Value>,
    field: &str,
    code: &'static str,
) -> Result<&'a str, Violation> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(Violation::new(code, format!("{field} is required"))),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Violation::new(code, format!("{field} must be a string"))),
    }
}

fn fill(out: &mut Checked, v: &Value, now_us: i64, skew_us: i64) -> Result<(), Violation> {
    let Some(obj) = v.as_object() else {
        return Err(Violation::new(
            sqlstate::EVENT_SHAPE,
            "each event must be a JSON object",
        ));
    };
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(Violation::new(
            sqlstate::EVENT_SHAPE,
            format!("unknown field {k:?} (an event has {})", FIELDS.join(", ")),
        ));
    }
    let key = text(obj, "idempotency_key", sqlstate::IDEMPOTENCY_KEY)?;
    validate::idempotency_key(key)?;
    out.idempotency_key = Some(key.to_string());
    let name = text(obj, "event_name", sqlstate::EVENT_NAME)?;
    validate::event_name(name)?;
    out.event_name = Some(name.to_string());
    let ts =
        validate::event_timestamp_text(text(obj, "event_timestamp", sqlstate::EVENT_TIMESTAMP)?)?;
    validate::event_timestamp_bounds(ts, now_us, skew_us)?;
    out.timestamp_us = Some(ts);
    if let Some(m) = obj.get("metadata") {
        validate::metadata(m)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000_000_000;
    const SKEW: i64 = 30_000_000;

    fn one(v: Value) -> Checked {
        check_events(&json!([v]), NOW, SKEW).remove(0)
    }

    #[test]
    fn the_envelope_is_an_array_of_one_to_a_thousand() {
        assert_eq!(envelope(&json!([{}])), Ok(1));
        assert_eq!(envelope(&Value::Array(vec![json!({}); 1000])), Ok(1000));
        for bad in [
            json!([]),
            Value::Array(vec![json!({}); 1001]),
            json!({}),
            json!("x"),
        ] {
            assert_eq!(
                envelope(&bad).unwrap_err().sqlstate,
                sqlstate::BATCH_ENVELOPE
            );
        }
        assert!(check_events(&json!({}), NOW, SKEW).is_empty());
    }

    #[test]
    fn a_good_item_comes_back_normalised() {
        let c = one(json!({"idempotency_key": "k", "event_name": "n",
                           "event_timestamp": "2026-01-31T12:00:00.0000005+01:00", "metadata": {"a": 1}}));
        assert_eq!(c.violation, None);
        assert_eq!(c.idempotency_key.as_deref(), Some("k"));
        assert_eq!(c.timestamp_us, Some(1_769_857_200_000_001));
        let c = one(
            json!({"idempotency_key": "k", "event_name": "n", "event_timestamp": "2026-01-31T12:00:00Z"}),
        );
        assert_eq!(c.violation, None, "metadata is optional");
    }

    #[test]
    fn each_bad_item_names_its_field_and_code() {
        let ok = json!({"idempotency_key": "k", "event_name": "n", "event_timestamp": "2026-01-31T12:00:00Z"});
        let with = |k: &str, v: Value| {
            let mut o = ok.clone();
            o[k] = v;
            o
        };
        let without = |k: &str| {
            let mut o = ok.clone();
            o.as_object_mut().unwrap().remove(k);
            o
        };
        let cases = [
            (json!(7), sqlstate::EVENT_SHAPE, "object"),
            (with("extra", json!(1)), sqlstate::EVENT_SHAPE, "\"extra\""),
            (
                without("idempotency_key"),
                sqlstate::IDEMPOTENCY_KEY,
                "idempotency_key is required",
            ),
            (
                with("idempotency_key", json!(1)),
                sqlstate::IDEMPOTENCY_KEY,
                "must be a string",
            ),
            (
                with("idempotency_key", json!(" x")),
                sqlstate::IDEMPOTENCY_KEY,
                "space",
            ),
            (
                without("event_name"),
                sqlstate::EVENT_NAME,
                "event_name is required",
            ),
            (
                with("event_name", json!("")),
                sqlstate::EVENT_NAME,
                "1 to 128",
            ),
            (
                without("event_timestamp"),
                sqlstate::EVENT_TIMESTAMP,
                "required",
            ),
            (
                with("event_timestamp", json!("2026-01-31T12:00:00")),
                sqlstate::EVENT_TIMESTAMP,
                "timezone",
            ),
            (
                with("event_timestamp", json!("2030-01-01T00:00:00Z")),
                sqlstate::EVENT_TIMESTAMP_FUTURE,
                "future",
            ),
            (
                with("metadata", json!({"a": {"b": 1}})),
                sqlstate::EVENT_METADATA,
                "metadata.a",
            ),
            (
                with("metadata", Value::Null),
                sqlstate::EVENT_METADATA,
                "null",
            ),
        ];
        for (item, code, needle) in cases {
            let v = one(item.clone())
                .violation
                .unwrap_or_else(|| panic!("{item} accepted"));
            assert_eq!(v.sqlstate, code, "{item}");
            assert!(
                v.message.contains(needle),
                "{:?} lacks {needle:?}",
                v.message
            );
        }
    }

    #[test]
    fn prepare_marks_the_first_good_item_of_each_key_and_fingerprints_it() {
        let items = json!([
            {"idempotency_key": "a", "event_name": "n", "event_timestamp": "2026-01-31T12:00:00Z", "metadata": {"x": 1}},
            {"idempotency_key": "a", "event_name": "", "event_timestamp": "2026-01-31T12:00:00Z"},
            {"idempotency_key": "a", "event_name": "n", "event_timestamp": "2026-01-31T12:00:00Z"},
            {"idempotency_key": "b", "event_name": "n", "event_timestamp": "2026-01-31T12:00:00Z"},
        ]);
        let p = prepare("acme", &items, NOW, SKEW).unwrap();
        let firsts: Vec<bool> = p.iter().map(|x| x.first_of_key).collect();
        assert_eq!(
            firsts,
            [true, false, false, true],
            "a bad item is never the first of its key"
        );
        assert!(p[1].fingerprint.is_none() && p[1].external_id.is_none());
        assert_eq!(p[0].external_id, Some(ids::external_id("acme", "a")));
        assert_eq!(p[0].external_id, p[2].external_id);
        assert_eq!(
            p[0].fingerprint,
            Some(ids::payload_fingerprint(
                "n",
                1_769_860_800_000_000,
                r#"{"x": 1}"#
            ))
        );
        assert_eq!(
            p[2].fingerprint,
            Some(ids::payload_fingerprint("n", 1_769_860_800_000_000, "{}")),
            "no metadata is {{}}"
        );
        assert_eq!(
            prepare("acme", &json!([]), NOW, SKEW).unwrap_err().sqlstate,
            sqlstate::BATCH_ENVELOPE
        );
    }

    #[test]
    fn items_are_judged_alone_and_in_order() {
        let items = json!([
            {"idempotency_key": "a", "event_name": "n", "event_timestamp": "2026-01-31T12:00:00Z"},
            {"idempotency_key": "b", "event_name": "", "event_timestamp": "2026-01-31T12:00:00Z"},
            {"idempotency_key": "c", "event_name": "n", "event_timestamp": "2026-01-31T12:00:00Z"},
        ]);
        let c = check_events(&items, NOW, SKEW);
        assert_eq!(c.len(), 3);
        assert!(c[0].violation.is_none() && c[2].violation.is_none());
        assert_eq!(
            c[1].violation.as_ref().unwrap().sqlstate,
            sqlstate::EVENT_NAME
        );
        assert_eq!(c[2].idempotency_key.as_deref(), Some("c"));
    }
}
