//! Stable identities of an event: the payload fingerprint that decides
//! "replay" versus "conflict", and the external_id Polar deduplicates on.
//! Both are persisted, so their definitions must never change.
use sha2::{Digest, Sha256};

/// sha256(event_name 0x1F unix_micros 0x1F metadata), where metadata is
/// jsonb's canonical text (sorted keys, one value per key), so the same
/// payload gives the same fingerprint whatever its JSON spelling.
pub fn payload_fingerprint(
    event_name: &str,
    unix_micros: i64,
    canonical_metadata: &str,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(event_name.as_bytes());
    h.update([0x1f]);
    h.update(unix_micros.to_string().as_bytes());
    h.update([0x1f]);
    h.update(canonical_metadata.as_bytes());
    h.finalize().into()
}

/// `pm_` + the first 160 bits of sha256(org 0x1F idempotency_key), in hex.
/// Derived from what the client declared unique, so even a re-recorded event
/// (after a restore, say) dedups at Polar, which keeps external ids forever.
pub fn external_id(organization_id: &str, idempotency_key: &str) -> String {
    let mut h = Sha256::new();
    h.update(organization_id.as_bytes());
    h.update([0x1f]);
    h.update(idempotency_key.as_bytes());
    let d = h.finalize();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(43);
    out.push_str("pm_");
    for b in &d[..20] {
        out.push(HEX[usize::from(b >> 4)].into());
        out.push(HEX[usize::from(b & 0x0f)].into());
    }
    out
}

/// `n` fresh event ids: time-ordered UUIDs (version 7, RFC 9562) of the
/// millisecond `unix_ms`, 74 bits of each from the OS CSPRNG. Drawn before
/// the INSERT so that the rows a call inserted can be told from rows already
/// there. Time-ordered so that an organization's new rows land at the end of
/// its range of the (organization_id, id) primary key instead of on a random
/// page of it: recording touches, caches and logs fewer index pages. The
/// price: while several organizations record, pages inside the index split
/// in half and stay about half full (BENCHMARKS.md, storage).
pub fn event_ids(n: usize, unix_ms: i64) -> Result<Vec<[u8; 16]>, getrandom::Error> {
    let mut bytes = vec![0u8; 16 * n];
    getrandom::getrandom(&mut bytes)?;
    // 48 bits of milliseconds: from 1970 to the year 10889.
    let ms = unix_ms.clamp(0, (1 << 48) - 1).to_be_bytes();
    Ok(bytes
        .chunks_exact(16)
        .map(|c| {
            let mut u: [u8; 16] = c.try_into().expect("16 bytes");
            u[..6].copy_from_slice(&ms[2..]);
            u[6] = (u[6] & 0x0f) | 0x70; // version 7
            u[8] = (u[8] & 0x3f) | 0x80; // RFC 9562 variant
            u
        })
        .collect())
}

/// The text PostgreSQL's jsonb_out gives for `v`, when `v` was parsed from
/// jsonb_out's own text (pgrx hands jsonb to Rust that way, and
/// serde_json keeps its key order and number spelling): `{"k": v, "k2": v2}`,
/// `[a, b]`, strings escaped as PostgreSQL's escape_json does. It is what
/// `metadata::text` yields in SQL, so fingerprints computed here equal the
/// ones 0.1 and 0.2 stored.
pub fn jsonb_text(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_jsonb(&mut out, v);
    out
}

fn write_jsonb(out: &mut String, v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_jsonb_string(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_jsonb(out, x);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_jsonb_string(out, k);
                out.push_str(": ");
                write_jsonb(out, x);
            }
            out.push('}');
        }
    }
}

/// PostgreSQL's escape_json: the two-character escapes, \u00xx (lower case)
/// for the other control characters, everything else as it is.
fn write_jsonb_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_version_7_of_the_millisecond_and_distinct() {
        let ms = 1_764_180_000_123; // 2025-11-26T18:00:00.123Z
        let u = event_ids(1000, ms).unwrap();
        assert_eq!(u.len(), 1000);
        assert!(u.iter().all(|x| x[6] >> 4 == 7 && x[8] >> 6 == 2));
        assert!(u.iter().all(|x| x[..6] == ms.to_be_bytes()[2..]));
        let distinct: std::collections::HashSet<_> = u.iter().collect();
        assert_eq!(distinct.len(), 1000);
        // Later milliseconds sort after earlier ones, whatever the random bits.
        let later = event_ids(1, ms + 1).unwrap()[0];
        assert!(u.iter().all(|x| *x < later));
        // Out-of-range clocks are clamped, never wrapped.
        assert_eq!(event_ids(1, -5).unwrap()[0][..6], [0; 6]);
        assert_eq!(event_ids(1, i64::MAX).unwrap()[0][..6], [0xff; 6]);
    }

    #[test]
    fn jsonb_text_is_jsonb_outs_spelling() {
        // Expected strings are what PostgreSQL 15 prints for these values
        // (SELECT '...'::jsonb); the e2e suite checks it against the server too.
        let cases = [
            (r#"{}"#, r#"{}"#),
            (r#"{"a": 1, "bb": "x"}"#, r#"{"a": 1, "bb": "x"}"#),
            (
                r#"{"a": 1.50, "b": -0, "c": 12345678901234567890123}"#,
                r#"{"a": 1.50, "b": -0, "c": 12345678901234567890123}"#,
            ),
            (
                r#"{"t": "tab\there \"q\" back\\slash \u0001 \u001f é 😀"}"#,
                "{\"t\": \"tab\\there \\\"q\\\" back\\\\slash \\u0001 \\u001f é 😀\"}",
            ),
            (
                r#"{"b": true, "f": false, "n": null, "l": [1, "x"]}"#,
                r#"{"b": true, "f": false, "n": null, "l": [1, "x"]}"#,
            ),
        ];
        for (input, want) in cases {
            let v: serde_json::Value = serde_json::from_str(input).unwrap();
            assert_eq!(jsonb_text(&v), want, "{input}");
        }
    }

    #[test]
    fn fingerprint_separates_fields() {
        let a = payload_fingerprint("ab", 1, "{}");
        assert_eq!(a, payload_fingerprint("ab", 1, "{}"));
        assert_ne!(a, payload_fingerprint("a", 1, "{}"));
        assert_ne!(a, payload_fingerprint("ab", 2, "{}"));
        assert_ne!(a, payload_fingerprint("ab", 1, "{\"a\": 1}"));
        // The separator keeps field boundaries: ("a", "b1") is not ("ab", "1").
        assert_ne!(
            payload_fingerprint("a\u{1f}1", 1, "{}"),
            payload_fingerprint("a", 11, "{}")
        );
    }

    #[test]
    fn external_ids_are_stable_and_scoped_by_org() {
        let x = external_id("acme", "k1");
        assert_eq!(x, external_id("acme", "k1"));
        assert_eq!(x.len(), 43);
        assert!(x.starts_with("pm_") && x[3..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(x, external_id("globex", "k1"));
        assert_ne!(external_id("a", "bc"), external_id("ab", "c"));
        // Pinned: a change here would re-bill every event resent after an upgrade.
        assert_eq!(external_id("acme", "k1"), external_id_reference());
    }

    fn external_id_reference() -> String {
        // sha256("acme\x1fk1"), first 20 bytes.
        let d = Sha256::digest(b"acme\x1fk1");
        format!(
            "pm_{}",
            d[..20]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    }
}
