//! What an event must satisfy to be accepted. These are Polar's ingest rules
//! (docs/polar.md, "What Polar accepts"), tightened where Polar's own docs
//! promise more than its code checks, so that no accepted event can later
//! poison an all-or-nothing batch at Polar.

use crate::sqlstate::{self, Violation};
use chrono::DateTime;
use serde_json::Value;

pub const EVENT_NAME_MAX: usize = 128;
pub const METADATA_MAX_KEYS: usize = 49;
pub const METADATA_KEY_MAX: usize = 40;
pub const METADATA_STRING_MAX: usize = 500;
pub const IDEMPOTENCY_KEY_MAX: usize = 255;
/// Longest text form of a metadata number, as PostgreSQL's numeric stores
/// and prints it (plain notation: `1e-16383` is 16,385 characters). An event
/// is judged on what is stored and sent to Polar, not on what the client sent.
pub const METADATA_NUMBER_MAX: usize = 64;
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

/// Parses an RFC 3339 timestamp that carries its own offset (`Z` or any
/// `±hh:mm` RFC 3339 allows, up to ±23:59; PostgreSQL's own parser stops at
/// ±15:59, so the text never reaches it) and returns microseconds since the
/// Unix epoch, rounded half up to PostgreSQL's microsecond. A leap second
/// (`23:59:60`) is the next minute's first instant, as in PostgreSQL. A naive
/// time would be read in some session's zone and billed at the wrong instant,
/// so it is refused rather than guessed.
pub fn event_timestamp_text(text: &str) -> Result<i64, Violation> {
    let ts = DateTime::parse_from_rfc3339(text).map_err(|_| {
        Violation::new(
            sqlstate::EVENT_TIMESTAMP,
            format!(
                "event_timestamp must be RFC 3339 with a timezone, like 2026-01-31T12:00:00Z (got {:?})",
                truncate(text, 64)
            ),
        )
    })?;
    // Seconds of year 1..9999 times 1e6 fit an i64 many times over.
    let micros = ts.timestamp() * 1_000_000 + (i64::from(ts.timestamp_subsec_nanos()) + 500) / 1000;
    event_timestamp_bounds(micros, i64::MIN, i64::MAX)?;
    Ok(micros)
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
                let stored = numeric_text_len(n.as_str());
                if stored.is_none_or(|len| len > METADATA_NUMBER_MAX) {
                    return bad(format!(
                        "metadata.{k} is a number whose stored form would be {} characters; at most {METADATA_NUMBER_MAX} are allowed (write it with fewer digits or a smaller exponent)",
                        stored.map_or("too many".to_string(), |l| l.to_string())
                    ));
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

/// The length of a JSON number literal's text once PostgreSQL's numeric has
/// read it (jsonb stores numbers as numeric, and prints them in plain
/// notation with every digit of their scale): `1E+5` is `100000`, `1.50` stays
/// `1.50`, `1e-3` is `0.001`, `-0` is `0`. None if it is not a JSON number.
/// Exponents are saturated, so no literal can overflow the arithmetic.
pub fn numeric_text_len(literal: &str) -> Option<usize> {
    let (negative, rest) = match literal.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, literal),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let exponent: i64 = match exponent {
        None => 0,
        Some(e) => {
            let (sign, digits) = match e.as_bytes().first() {
                Some(b'-') => (-1, &e[1..]),
                Some(b'+') => (1, &e[1..]),
                _ => (1, e),
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Past a billion digits the answer is "far too long" either way.
            let magnitude = digits
                .trim_start_matches('0')
                .parse::<i64>()
                .unwrap_or(if digits.trim_start_matches('0').is_empty() {
                    0
                } else {
                    1 << 40
                })
                .min(1 << 40);
            sign * magnitude
        }
    };
    // The digits after any leading zeros (counted without building them:
    // this runs for every number of every event recorded).
    let leading_zeros = int
        .bytes()
        .chain(frac.bytes())
        .take_while(|&b| b == b'0')
        .count();
    let significant = (int.len() + frac.len() - leading_zeros) as i64;
    // Digits after the decimal point that numeric keeps (its display scale).
    let scale = (frac.len() as i64 - exponent).max(0);
    let len = if significant == 0 {
        // Zero keeps its scale ("0.000") and has no sign.
        return Some(1 + if scale > 0 { 1 + scale as usize } else { 0 });
    } else if scale == 0 {
        // Whole: the significant digits then the zeros the exponent adds.
        significant + (exponent - frac.len() as i64).max(0)
    } else {
        // Digits before the point (at least "0"), the point, the scale.
        (significant - scale).max(1) + 1 + scale
    };
    Some(len as usize + usize::from(negative))
}

/// What Polar accepts as a team customer (its `CustomerTeamCreate`): a name of
/// at most 256 characters, and an email, or else an owner with an email. The
/// id becomes the customer's `external_id`, and travels in URL paths.
pub struct Organization<'a> {
    pub id: Option<&'a str>,
    pub name: Option<&'a str>,
    pub email: Option<&'a str>,
    pub owner_email: Option<&'a str>,
    pub owner_name: Option<&'a str>,
    pub owner_external_id: Option<&'a str>,
}

pub const ORG_ID_MAX: usize = 255;
pub const ORG_NAME_MAX: usize = 256;

pub fn organization(o: &Organization) -> Result<(), Violation> {
    let bad = |m: String| Err(Violation::new(sqlstate::ORG_INVALID, m));
    let id = o.id.unwrap_or("");
    if id.is_empty() || id.chars().count() > ORG_ID_MAX || id.chars().any(char::is_control) {
        return bad(format!(
            "id must be 1 to {ORG_ID_MAX} characters without control characters"
        ));
    }
    if id.trim() != id {
        return bad("id must not start or end with white space".into());
    }
    for (field, v) in [("name", o.name), ("owner_name", o.owner_name)] {
        if let Some(v) = v {
            let n = v.trim().chars().count();
            if n == 0 || v.chars().count() > ORG_NAME_MAX || v.chars().any(char::is_control) {
                return bad(format!(
                    "{field} must be 1 to {ORG_NAME_MAX} characters, not blank, without control characters"
                ));
            }
        }
    }
    if o.name.is_none() {
        return bad("name is required".into());
    }
    if let Some(e) = o.email {
        email("email", e)?;
    }
    if let Some(e) = o.owner_email {
        email("owner_email", e)?;
    }
    if o.owner_email.is_none() && (o.owner_name.is_some() || o.owner_external_id.is_some()) {
        return bad("an owner needs owner_email".into());
    }
    if let Some(x) = o.owner_external_id {
        if x.is_empty() || x.chars().any(char::is_control) {
            return bad("owner_external_id must be non-empty, without control characters".into());
        }
    }
    if o.email.is_none() && o.owner_email.is_none() {
        return bad(
            "a team customer needs an email, or an owner with an email (Polar: \"owner is required when email is not set\")"
                .into(),
        );
    }
    Ok(())
}

/// An address Polar's email check could accept: one `@`, a local part of 1
/// to 64 characters and a dotted domain, no white space, at most 254 in all.
/// (Polar also checks that the domain can receive mail; that needs DNS.)
pub fn email(field: &str, v: &str) -> Result<(), Violation> {
    let bad = || {
        Err(Violation::new(
            sqlstate::ORG_INVALID,
            format!("{field} must be an email address like billing@example.org"),
        ))
    };
    if v.len() > 254 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad();
    }
    let Some((local, domain)) = v.split_once('@') else {
        return bad();
    };
    let labels: Vec<&str> = domain.split('.').collect();
    if local.is_empty()
        || local.len() > 64
        || domain.contains('@')
        || labels.len() < 2
        || labels
            .iter()
            .any(|l| l.is_empty() || l.starts_with('-') || l.ends_with('-'))
    {
        return bad();
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
        assert_eq!(
            event_timestamp_text("2026-01-31T12:00:00Z"),
            Ok(1_769_860_800_000_000)
        );
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
    fn any_rfc3339_offset_leap_seconds_and_long_fractions_normalise() {
        let base = 1_769_860_800_000_000; // 2026-01-31T12:00:00Z
        let h = 3_600_000_000;
        assert_eq!(
            event_timestamp_text("2026-01-31T12:00:00+16:00"),
            Ok(base - 16 * h)
        );
        assert_eq!(
            event_timestamp_text("2026-01-31T12:00:00-23:59"),
            Ok(base + 24 * h - 60_000_000)
        );
        assert_eq!(
            event_timestamp_text("2026-01-31T12:00:00+23:59"),
            Ok(base - 24 * h + 60_000_000)
        );
        assert_eq!(
            event_timestamp_text("2026-01-31T11:59:60Z"),
            Ok(base),
            "a leap second is the next minute's start"
        );
        assert_eq!(
            event_timestamp_text("2026-01-31T12:00:00.123456789012Z"),
            Ok(base + 123_457),
            "rounded half up to the microsecond"
        );
        assert_eq!(
            event_timestamp_text("2026-01-31T12:00:00.0000004Z"),
            Ok(base)
        );
        assert_eq!(
            event_timestamp_text("9999-12-31T23:59:59.999999999Z"),
            Ok(253_402_300_800_000_000)
        );
        assert_eq!(
            code(event_timestamp_text("0001-01-01T00:00:00Z")),
            sqlstate::EVENT_TIMESTAMP
        );
        assert_eq!(
            code(event_timestamp_text("2026-01-31T12:00:00+24:00")),
            sqlstate::EVENT_TIMESTAMP
        );
    }

    #[test]
    fn organizations_follow_polars_team_customer_rule() {
        let org = |email: Option<&'static str>, owner: Option<&'static str>| Organization {
            id: Some("acme"),
            name: Some("Acme"),
            email,
            owner_email: owner,
            owner_name: None,
            owner_external_id: None,
        };
        assert!(organization(&org(Some("billing@acme.io"), None)).is_ok());
        assert!(organization(&org(None, Some("ceo@acme.io"))).is_ok());
        let v = organization(&org(None, None)).unwrap_err();
        assert_eq!(v.sqlstate, sqlstate::ORG_INVALID);
        assert!(v.message.contains("owner"), "{}", v.message);
        for bad in [
            "x",
            "a@b",
            "@b.c",
            "a b@c.d",
            "a@b..c",
            "a@-b.c",
            "a@b.c@d.e",
        ] {
            let v = organization(&org(Some(bad), None)).unwrap_err();
            assert!(v.message.starts_with("email"), "{bad}: {}", v.message);
        }
        let mut o = org(Some("a@b.co"), None);
        o.name = Some("  ");
        assert!(organization(&o).unwrap_err().message.contains("name"));
        o.name = None;
        assert!(organization(&o)
            .unwrap_err()
            .message
            .contains("name is required"));
        let mut o = org(Some("a@b.co"), None);
        o.id = Some("");
        assert!(organization(&o).unwrap_err().message.starts_with("id"));
        o.id = Some(" acme");
        assert!(organization(&o).is_err());
        let mut o = org(Some("a@b.co"), None);
        o.owner_name = Some("Jo");
        assert!(organization(&o)
            .unwrap_err()
            .message
            .contains("owner_email"));
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
            (
                serde_json::from_str::<Value>(r#"{"tiny": 1e-16383}"#).unwrap(),
                "metadata.tiny is a number whose stored form would be 16385 characters",
            ),
            (
                serde_json::from_str::<Value>(&format!(r#"{{"wide": {}}}"#, "9".repeat(1000)))
                    .unwrap(),
                "metadata.wide",
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

    #[test]
    fn numbers_are_measured_as_postgresql_prints_them() {
        for (literal, printed) in [
            ("0", "0"),
            ("-0", "0"),
            ("-0.0", "0.0"),
            ("0e-5", "0.00000"),
            ("12", "12"),
            ("-12", "-12"),
            ("1.50", "1.50"),
            ("1E+5", "100000"),
            ("1e5", "100000"),
            ("1.5e3", "1500"),
            ("1.50e1", "15.0"),
            ("120e-1", "12.0"),
            ("1e-3", "0.001"),
            ("0.001", "0.001"),
            ("-1.25e-2", "-0.0125"),
            ("00012.5", "12.5"),
        ] {
            assert_eq!(
                numeric_text_len(literal),
                Some(printed.len()),
                "{literal} prints as {printed}"
            );
        }
        assert_eq!(numeric_text_len("1e-16383"), Some(16385));
        assert_eq!(numeric_text_len("1e400"), Some(401));
        assert!(numeric_text_len("1e999999999999999999999").unwrap() > 1 << 39);
        assert!(numeric_text_len("1e-999999999999999999999").unwrap() > 1 << 39);
        for bad in ["", "-", "e5", "1e", "1.2.3", "abc", "1e+-2"] {
            assert_eq!(numeric_text_len(bad), None, "{bad:?}");
        }
        // The bound sits where an ordinary quantity never reaches it.
        assert!(metadata(&serde_json::from_str(r#"{"usd": 1234567.891234}"#).unwrap()).is_ok());
        assert!(metadata(&serde_json::from_str(r#"{"n": 1e63}"#).unwrap()).is_ok());
        assert!(metadata(&serde_json::from_str(r#"{"n": 1e64}"#).unwrap()).is_err());
    }
}
