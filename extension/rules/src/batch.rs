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

/// Containers nested this deep (the batch array is depth 0) are read as
/// empty ones. A valid item nests three levels (batch, event, metadata), so a
/// container this deep is refused whatever it holds, and an empty one is
/// refused with the same field named.
pub const READ_DEPTH: usize = 8;

/// Reads a batch from its JSON text (from SQL, jsonb's own output). serde_json
/// refuses more than 128 levels of nesting, which one item's metadata can
/// hold, and that must fail the item, not the whole call. So if the plain
/// parse fails, the text is read again level by level down to READ_DEPTH,
/// and what lies deeper is skipped without recursion or allocation.
pub fn parse(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str(text).or_else(|_| read_shallow(text, 0))
}

fn read_shallow(text: &str, depth: usize) -> Result<Value, serde_json::Error> {
    use serde_json::value::RawValue;
    match text.trim_start().as_bytes().first() {
        Some(b'[') if depth >= READ_DEPTH => Ok(Value::Array(Vec::new())),
        Some(b'{') if depth >= READ_DEPTH => Ok(Value::Object(Default::default())),
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(text)?;
            items
                .iter()
                .map(|v| read_shallow(v.get(), depth + 1))
                .collect::<Result<_, _>>()
                .map(Value::Array)
        }
        Some(b'{') => {
            let Fields(fields) = serde_json::from_str(text)?;
            fields
                .into_iter()
                .map(|(k, v)| Ok((k, read_shallow(v.get(), depth + 1)?)))
                .collect::<Result<_, _>>()
                .map(Value::Object)
        }
        _ => serde_json::from_str(text),
    }
}

/// An object's fields in their order, each value still as text.
struct Fields<'a>(Vec<(String, &'a serde_json::value::RawValue)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Fields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Fields<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Fields<'a>, M::Error> {
                let mut out = Vec::new();
                while let Some(kv) = m.next_entry()? {
                    out.push(kv);
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

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
    envelope_len(events.as_array().map(Vec::len))
}

/// The envelope's rule on its length (None: events is not an array).
pub fn envelope_len(len: Option<usize>) -> Result<usize, Violation> {
    match len {
        Some(n) if n > 0 && n <= MAX_EVENTS => Ok(n),
        Some(n) => Err(Violation::new(
            sqlstate::BATCH_ENVELOPE,
            format!("events must hold 1 to {MAX_EVENTS} events (got {n})"),
        )),
        None => Err(Violation::new(
            sqlstate::BATCH_ENVELOPE,
            "events must be a JSON array",
        )),
    }
}

/// The SQLSTATE of a violation at `field` (a dotted path inside an event):
/// its top-level field's code, or the event's shape for any other field.
pub fn field_code(field: &str) -> &'static str {
    match field.split('.').next().unwrap_or_default() {
        "event_name" => sqlstate::EVENT_NAME,
        "idempotency_key" => sqlstate::IDEMPOTENCY_KEY,
        "event_timestamp" => sqlstate::EVENT_TIMESTAMP,
        "metadata" => sqlstate::EVENT_METADATA,
        _ => sqlstate::EVENT_SHAPE,
    }
}

/// An event whose JSON holds `field` twice (a dotted path): refused, since
/// which of the two values counts would be a guess. jsonb keeps the last one
/// silently, so the sidecar checks this while parsing a request.
pub fn duplicate_key(field: &str) -> Violation {
    Violation::new(
        field_code(field),
        format!("{field} appears twice in the event"),
    )
}

/// Why an item could not even reach the database, if it could not: a NUL
/// in any string or key (a PostgreSQL text cannot hold one, and jsonb refuses
/// the whole call), or a number whose stored form would pass
/// METADATA_NUMBER_MAX (or overflow numeric, refusing the whole call too).
/// The sidecar sends only items that pass, so one item can never fail its
/// neighbours; the answer names the field as the full check would.
pub fn unstorable(item: &Value) -> Option<Violation> {
    fn walk(v: &Value, field: &str) -> Option<Violation> {
        let code = field_code(field);
        let name = if field.is_empty() { "the event" } else { field };
        match v {
            Value::String(s) if s.contains('\0') => {
                Some(Violation::new(code, format!("{name} must not contain NUL")))
            }
            Value::Number(n) => {
                let len = validate::numeric_text_len(n.as_str()).unwrap_or(usize::MAX);
                (len > validate::METADATA_NUMBER_MAX).then(|| {
                    Violation::new(
                        code,
                        format!(
                            "{name} is a number whose stored form would be {} characters; at most {} are allowed",
                            if len == usize::MAX { "too many".to_string() } else { len.to_string() },
                            validate::METADATA_NUMBER_MAX
                        ),
                    )
                })
            }
            Value::Array(a) => a.iter().find_map(|x| walk(x, field)),
            Value::Object(m) => m.iter().find_map(|(k, x)| {
                if k.contains('\0') {
                    return Some(Violation::new(
                        code,
                        format!("{name}: keys must not contain NUL"),
                    ));
                }
                let sub = if field.is_empty() {
                    k.clone()
                } else {
                    format!("{field}.{k}")
                };
                walk(x, &sub)
            }),
            _ => None,
        }
    }
    walk(item, "")
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
    fn items_the_database_could_not_store_are_named_before_it_sees_them() {
        let ok = json!({"idempotency_key": "k", "event_name": "e", "event_timestamp": "t",
                        "metadata": {"n": 1.5, "s": "x"}});
        assert_eq!(unstorable(&ok), None);
        let nul = unstorable(&json!({"event_name": "a\u{0}b"})).unwrap();
        assert_eq!(nul.sqlstate, sqlstate::EVENT_NAME);
        assert_eq!(nul.message, "event_name must not contain NUL");
        let deep = unstorable(&json!({"metadata": {"a": {"b": ["x\u{0}"]}}})).unwrap();
        assert_eq!(deep.sqlstate, sqlstate::EVENT_METADATA);
        assert!(
            deep.message.starts_with("metadata.a.b must not"),
            "{}",
            deep.message
        );
        let key = unstorable(&json!({"metadata": {"k\u{0}": 1}})).unwrap();
        assert_eq!(key.sqlstate, sqlstate::EVENT_METADATA);
        let tiny: Value = serde_json::from_str(r#"{"metadata": {"q": 1e-20000}}"#).unwrap();
        let v = unstorable(&tiny).unwrap();
        assert_eq!(v.sqlstate, sqlstate::EVENT_METADATA);
        assert!(
            v.message
                .contains("metadata.q is a number whose stored form would be 20002"),
            "{}",
            v.message
        );
        let elsewhere: Value = serde_json::from_str(r#"{"event_name": 1e999999}"#).unwrap();
        assert_eq!(
            unstorable(&elsewhere).unwrap().sqlstate,
            sqlstate::EVENT_NAME
        );
        assert_eq!(
            unstorable(&json!("a\u{0}")).unwrap().sqlstate,
            sqlstate::EVENT_SHAPE
        );
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

    #[test]
    fn parse_reads_any_depth_and_refuses_only_the_deep_item() {
        let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
        let text = format!(
            r#"[{{"idempotency_key":"a","event_name":"e","event_timestamp":"2026-01-01T00:00:00Z","metadata":{{"n":{deep}}}}},
               {{"idempotency_key":"b","event_name":"e","event_timestamp":"2026-01-01T00:00:00Z","metadata":{{"z":1,"a":123456789012345678901234567890}}}}]"#
        );
        assert!(
            serde_json::from_str::<Value>(&text).is_err(),
            "deeper than serde_json reads"
        );
        let v = parse(&text).unwrap();
        let checked = check_events(&v, NOW, SKEW);
        let bad = checked[0]
            .violation
            .as_ref()
            .expect("the deep item is refused");
        assert!(bad.message.contains("metadata.n"), "{}", bad.message);
        assert_eq!(checked[1].violation, None, "its neighbour is not");
        // Order and exact numbers survive, so fingerprints do too.
        assert_eq!(
            v[1]["metadata"].to_string(),
            r#"{"z":1,"a":123456789012345678901234567890}"#
        );
        // A shallow text reads as plain serde_json reads it.
        let plain = r#"[{"a":{"b":[1,2,{"c":"d"}]}}]"#;
        assert_eq!(
            parse(plain).unwrap(),
            serde_json::from_str::<Value>(plain).unwrap()
        );
        // Past READ_DEPTH containers are read as empty ones of their kind.
        let nine = format!(
            "{}{}",
            "[".repeat(READ_DEPTH + 2),
            "]".repeat(READ_DEPTH + 2)
        );
        let mut v = &parse(&format!("[{nine}, {deep}]")).unwrap()[0];
        for _ in 0..READ_DEPTH - 1 {
            v = &v[0];
        }
        assert_eq!(v, &Value::Array(vec![]));
        assert!(parse("[1,").is_err(), "broken JSON stays an error");
    }

    #[test]
    fn a_field_found_twice_is_named_with_its_fields_code() {
        for (field, code) in [
            ("event_name", sqlstate::EVENT_NAME),
            ("metadata.tokens", sqlstate::EVENT_METADATA),
            ("metadata", sqlstate::EVENT_METADATA),
            ("idempotency_key", sqlstate::IDEMPOTENCY_KEY),
            ("event_timestamp", sqlstate::EVENT_TIMESTAMP),
            ("colour", sqlstate::EVENT_SHAPE),
        ] {
            let v = duplicate_key(field);
            assert_eq!(v.sqlstate, code, "{field}");
            assert!(v.message.starts_with(field), "{}", v.message);
        }
        assert_eq!(
            envelope_len(Some(0)).unwrap_err().sqlstate,
            sqlstate::BATCH_ENVELOPE
        );
        assert_eq!(envelope_len(Some(MAX_EVENTS)), Ok(MAX_EVENTS));
        assert!(envelope_len(None).unwrap_err().message.contains("array"));
    }
}
