//! API key format: `ak_` + 48 base62 characters from the OS CSPRNG.
//! 48 base62 characters carry ~285 bits, far beyond guessing; the key is
//! opaque (no claims), so a SHA-256 of it is all the database ever keeps.

use sha2::{Digest, Sha256};

pub const PREFIX: &str = "ak_";
pub const BODY_LEN: usize = 48;
pub const KEY_LEN: usize = PREFIX.len() + BODY_LEN;
/// Characters of the display hint (`ak_` + 4), enough to tell keys apart in a list.
pub const START_LEN: usize = PREFIX.len() + 4;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A fresh key. Rejection sampling keeps every character uniform: bytes
/// >= 248 (= 4 * 62) are discarded instead of folded, which would bias.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(PREFIX);
    let mut buf = [0u8; 64];
    while key.len() < KEY_LEN {
        getrandom::getrandom(&mut buf)?;
        for b in buf {
            if b < 248 && key.len() < KEY_LEN {
                key.push(ALPHABET[(b % 62) as usize] as char);
            }
        }
    }
    Ok(key)
}

/// True when `key` has the exact shape of a key; checked before any lookup.
pub fn is_wellformed(key: &str) -> bool {
    key.len() == KEY_LEN
        && key.starts_with(PREFIX)
        && key.as_bytes()[PREFIX.len()..]
            .iter()
            .all(u8::is_ascii_alphanumeric)
}

/// The display hint stored beside the hash (`ak_Xy3f`).
pub fn start(key: &str) -> &str {
    &key[..START_LEN.min(key.len())]
}

/// What the database stores: SHA-256 of the whole key. Same as SQL's
/// `sha256(convert_to(key, 'UTF8'))`, which the extension uses on the hot path.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ten_thousand_keys_are_wellformed_and_unique() {
        let keys: HashSet<String> = (0..10_000).map(|_| generate().unwrap()).collect();
        assert_eq!(keys.len(), 10_000);
        for k in &keys {
            assert!(is_wellformed(k), "{k}");
            assert_eq!(k.len(), 51);
        }
    }

    #[test]
    fn characters_are_roughly_uniform() {
        let mut counts = [0usize; 128];
        for _ in 0..2_000 {
            for b in generate().unwrap().bytes().skip(3) {
                counts[b as usize] += 1;
            }
        }
        let expected = 2_000.0 * 48.0 / 62.0; // ~1548 per character
        for &c in ALPHABET {
            let n = counts[c as usize] as f64;
            assert!(
                (n - expected).abs() < expected * 0.15,
                "{} seen {n} times",
                c as char
            );
        }
    }

    #[test]
    fn malformed_keys_are_refused() {
        let good = generate().unwrap();
        assert!(is_wellformed(&good));
        for bad in [
            "",
            "ak_",
            &good[..50],
            &format!("{good}x"),
            &good.replacen("ak_", "ab_", 1),
            &format!("ak_{}-", &good[3..50]),
            &format!("ak_{}é", &good[3..49]),
            &format!("ak_+{}", &good[4..]),
            &format!("AK_{}", &good[3..]),
        ] {
            assert!(!is_wellformed(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn start_and_hash() {
        let k = "ak_Xy3fAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert_eq!(start(k), "ak_Xy3f");
        assert_eq!(hash(k).len(), 32);
        assert_ne!(hash(k), hash(&k.replace('X', "Y")));
    }
}
