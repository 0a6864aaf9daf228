//! What an event must satisfy to be accepted. These are Polar's ingest rules
//! (shared/polar/POLAR-API.md §1), tightened where Polar's own docs promise
//! more than its code checks, so that no accepted event can later poison an
//! all-or-nothing batch at Polar.

use crate::sqlstate::{self, Violation};
use chrono::{DateTime, FixedOffset};
use serde_json::Value;

pub const EVENT_NAME_MAX: usize = 128;
pub const METADATA_MAX_KEYS: usize = 49;
pub const METADATA_KEY_MAX: usize = 40;
pub const METADATA_STRING_MAX: usize = 500;
pub const IDEMPOTENCY_KEY_MAX: usize = 255;
/// Added to every event sent to Polar (its event list does not return
/// `external_id`, so reconciliation matches on this). Polar's documented limit
/// is 50 keys, which is why clients get 49.
pub const RESERVED_METADATA_KEY: &str = "meter_event_id";
/// Earliest accepted event time. Older values are legal in RFC 3339 but not
/// all of them in Python's datetime, which Polar parses with.
pub const EARLIEST_TIMESTAMP: &str = "1970-01-01T00:00:00Z";

pub fn idempotency_key(key: &str) -> Result<(), Violation> {
    let bad = |why: &str| {
        Err(Violation::new(
            sqlstate::IDEMPOTENCY_KEY,
            format!("idempotency_key {why}"),
        ))
    };
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_MAX {
        return bad(&format!(
            "must be 1 to {IDEMPOTENCY_KEY_MAX} characters (got {})",
            key.chars().count()
        ));
    }
    if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return bad("must be printable ASCII (0x20 to 0x7E)");
    }
    if key.starts_with(' ') || key.ends_with(' ') {
        return bad("must not start or end with a space");
    }
    Ok(())
}

pub fn event_name(name: &str) -> Result<(), Violation> {
    let n = name.chars().count();
    if n == 0 || n > EVENT_NAME_MAX {
        return Err(Violation::new(
            sqlstate::EVENT_NAME,
            format!("event_name must be 1 to {EVENT_NAME_MAX} characters (got {n})"),
        ));
    }
    if name.contains('\0') {
        return Err(Violation::new(
            sqlstate::EVENT_NAME,
            "event_name must not contain NUL",
        ));
    }
    Ok(())
}

/// Parses an RFC 3339 timestamp that carries its own offset (`Z` or `±hh:mm`).
/// A naive time would be read in some session's zone and billed at the wrong
/// instant, so it is refused rather than guessed.
pub fn event_timestamp_text(text: &str) -> Result<DateTime<FixedOffset>, Violation> {
    let ts = DateTime::parse_from_rfc3339(text).map_err(|_| {
        Violation::new(
            sqlstate::EVENT_TIMESTAMP,
            format!(
                "event_timestamp must be RFC 3339 with a timezone, like 2026-01-31T12:00:00Z (got {:?})",
                truncate(text, 64)
            ),
        )
    })?;
    event_timestamp_bounds(ts.timestamp_micros(), i64::MIN, i64::MAX)?;
    Ok(ts)
}

/// Bounds on the instant (an `i64::MAX` skew checks only the lower bound), given in microseconds since the Unix epoch: not
/// before 1970 and not later than `now + skew` (Polar refuses future events).
pub fn event_timestamp_bounds(ts_us: i64, now_us: i64, skew_us: i64) -> Result<(), Violation> {
    if ts_us < 0 {
        return Err(Violation::new(
            sqlstate::EVENT_TIMESTAMP,
            format!("event_timestamp must not be before {EARLIEST_TIMESTAMP}"),
        ));
    }
    if skew_us != i64::MAX && ts_us > now_us.saturating_add(skew_us) {
        return Err(Violation::new(
            sqlstate::EVENT_TIMESTAMP_FUTURE,
            format!(
                "event_timestamp is {:.3}s in the future; at most {:.3}s of clock skew is allowed",
                (ts_us - now_us) as f64 / 1e6,
                skew_us as f64 / 1e6
            ),
        ));
    }
    Ok(())
}

/// Metadata: a flat object of at most 49 keys (1 to 40 characters, not the
/// reserved key), whose values are a string of 1 to 500 characters without
/// NUL, a finite number, or a boolean. Nothing nested, no null.
pub fn metadata(value: &Value) -> Result<(), Violation> {
    let bad = |msg: String| Err(Violation::new(sqlstate::EVENT_METADATA, msg));
    let Some(map) = value.as_object() else {
        return bad(format!(
            "metadata must be a JSON object (got {})",
            kind(value)
        ));
    };
    if map.len() > METADATA_MAX_KEYS {
        return bad(format!(
            "metadata has {} keys; at most {METADATA_MAX_KEYS} are allowed",
            map.len()
        ));
    }
    for (k, v) in map {
        let klen = k.chars().count();
        if klen == 0 || klen > METADATA_KEY_MAX {
            return bad(format!(
                "metadata key {:?} must be 1 to {METADATA_KEY_MAX} characters (got {klen})",
                truncate(k, 48)
            ));
        }
        if k.contains('\0') {
            return bad("metadata keys must not contain NUL".into());
        }
        if k == RESERVED_METADATA_KEY {
            return bad(format!("metadata.{k} is reserved by polar-meter"));
        }
        match v {
            Value::String(s) => {
                let n = s.chars().count();
                if n == 0 || n > METADATA_STRING_MAX {
                    return bad(format!(
                        "metadata.{k} must be a string of 1 to {METADATA_STRING_MAX} characters (got {n})"
                    ));
                }
                if s.contains('\0') {
                    return bad(format!("metadata.{k} must not contain NUL"));
                }
            }
            Value::Number(n) => {
                if !n.as_f64().is_some_and(f64::is_finite) {
                    return bad(format!("metadata.{k} is a number out of range"));
                }
            }
            Value::Bool(_) => {}
            other => {
                return bad(format!(
                    "metadata.{k} must be a string, number or boolean (got {})",
                    kind(other)
                ))
            }
        }
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        s.chars().take(max).chain("…".chars()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code<T>(r: Result<T, Violation>) -> &'static str {
        r.err().expect("expected a violation").sqlstate
    }

    #[test]
    fn idempotency_keys() {
        assert!(idempotency_key("a").is_ok());
        assert!(idempotency_key("order 42/line-7").is_ok());
        assert!(idempotency_key(&"x".repeat(255)).is_ok());
        for bad in ["", " lead", "trail ", "tab\there", "é", "nul\0"] {
            assert_eq!(
                code(idempotency_key(bad)),
                sqlstate::IDEMPOTENCY_KEY,
                "{bad:?}"
            );
        }
        assert_eq!(
            code(idempotency_key(&"x".repeat(256))),
            sqlstate::IDEMPOTENCY_KEY
        );
    }

    #[test]
    fn event_names() {
        assert!(event_name("api.request").is_ok());
        assert!(
            event_name(&"é".repeat(128)).is_ok(),
            "counted in characters, not bytes"
        );
        let long = event_name(&"n".repeat(129)).unwrap_err();
        assert_eq!(long.sqlstate, sqlstate::EVENT_NAME);
        assert!(long.message.contains("event_name"), "{}", long.message);
        assert_eq!(code(event_name("")), sqlstate::EVENT_NAME);
        assert_eq!(code(event_name("a\0b")), sqlstate::EVENT_NAME);
    }

    #[test]
    fn timestamps_need_a_zone() {
        assert!(event_timestamp_text("2026-01-31T12:00:00Z").is_ok());
        assert!(event_timestamp_text("2026-01-31T12:00:00.123456+02:00").is_ok());
        for bad in [
            "2026-01-31T12:00:00",
            "2026-01-31 12:00:00",
            "2026-01-31",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "yesterday",
            "",
            "1700000000",
            "0000-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
        ] {
            let v = event_timestamp_text(bad).unwrap_err();
            assert_eq!(v.sqlstate, sqlstate::EVENT_TIMESTAMP, "{bad:?}");
            assert!(v.message.contains("event_timestamp"));
        }
    }

    #[test]
    fn timestamp_bounds() {
        let now = 1_800_000_000_000_000;
        let skew = 30_000_000;
        assert!(event_timestamp_bounds(now, now, skew).is_ok());
        assert!(event_timestamp_bounds(now + skew, now, skew).is_ok());
        assert!(event_timestamp_bounds(0, now, skew).is_ok());
        assert_eq!(
            code(event_timestamp_bounds(now + skew + 1, now, skew)),
            sqlstate::EVENT_TIMESTAMP_FUTURE
        );
        assert_eq!(
            code(event_timestamp_bounds(-1, now, skew)),
            sqlstate::EVENT_TIMESTAMP
        );
        assert_eq!(
            code(event_timestamp_bounds(i64::MAX, now, skew)),
            sqlstate::EVENT_TIMESTAMP_FUTURE
        );
    }

    #[test]
    fn metadata_accepts_flat_scalars() {
        let mut m = serde_json::Map::new();
        for i in 0..49 {
            m.insert(format!("k{i}"), json!(i));
        }
        assert!(metadata(&Value::Object(m)).is_ok());
        assert!(metadata(&json!({})).is_ok());
        let ok = json!({"model": "x", "tokens": 12, "ratio": 0.5, "cached": false,
                        "big": serde_json::from_str::<Value>("123456789012345678901234567890").unwrap(),
                        "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk": "v"});
        assert!(metadata(&ok).is_ok());
        assert!(metadata(&json!({"s": "é".repeat(500)})).is_ok());
    }

    #[test]
    fn metadata_rejections_name_the_field() {
        let mut m = serde_json::Map::new();
        for i in 0..50 {
            m.insert(format!("k{i}"), json!(i));
        }
        let cases = [
            (Value::Object(m.clone()), "50 keys"),
            (
                {
                    m.insert("k50".into(), json!(1));
                    Value::Object(m)
                },
                "51 keys",
            ),
            (json!({"nested": {"a": 1}}), "metadata.nested"),
            (json!({"list": [1]}), "metadata.list"),
            (json!({"nul": null}), "metadata.nul"),
            (json!({"empty": ""}), "metadata.empty"),
            (json!({"long": "x".repeat(501)}), "metadata.long"),
            (json!({"nulbyte": "a\u{0}b"}), "metadata.nulbyte"),
            (json!({"": 1}), "metadata key \"\""),
            (json!({"k".repeat(41): 1}), "must be 1 to 40"),
            (json!({"meter_event_id": "x"}), "reserved"),
            (
                serde_json::from_str::<Value>(r#"{"huge": 1e400}"#).unwrap(),
                "metadata.huge",
            ),
            (json!([1, 2]), "JSON object"),
            (json!("str"), "JSON object"),
            (Value::Null, "JSON object"),
        ];
        for (input, needle) in cases {
            let v = metadata(&input).expect_err(needle);
            assert_eq!(v.sqlstate, sqlstate::EVENT_METADATA);
            assert!(
                v.message.contains(needle),
                "{:?} does not mention {needle:?}",
                v.message
            );
        }
    }
}
