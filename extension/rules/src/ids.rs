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
    let mut out = String::with_capacity(43);
    out.push_str("pm_");
    for b in &d[..20] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
