//! API keys: generation from the OS CSPRNG, the format check, the hash and the
//! display hint (polar_meter_rules::keys). Storage and verification: keys.sql.
use pgrx::prelude::*;
use polar_meter_rules::keys;

/// A new plaintext key. Volatile: every call draws fresh randomness.
#[pg_extern(volatile, parallel_unsafe)]
fn _generate_api_key() -> String {
    keys::generate().unwrap_or_else(|e| error!("polar_meter: OS random source failed: {e}"))
}

#[pg_extern(immutable, strict, parallel_safe)]
fn _api_key_wellformed(key: &str) -> bool {
    keys::is_wellformed(key)
}

/// What api_key.key_hash stores: SHA-256 of the key's bytes.
#[pg_extern(immutable, strict, parallel_safe)]
fn _key_hash(key: &str) -> Vec<u8> {
    keys::hash(key).to_vec()
}

/// What api_key.start stores: the key's first characters, enough to tell keys apart.
#[pg_extern(immutable, strict, parallel_safe)]
fn _api_key_start(key: &str) -> &str {
    keys::start(key)
}
