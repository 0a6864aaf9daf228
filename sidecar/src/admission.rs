//! Authentication before anything scarce. A request to record events is
//! admitted on its API key before it may take a batch slot, a group-commit
//! place or a share of the body budget, so a client without a valid key
//! holds nothing but its socket. Verdicts are cached per key hash (never the
//! key itself): a known good key for `ok_ttl`, a refused one for `bad_ttl`,
//! so the hot path gains no round trip. This is only a gate: the recording
//! call verifies the key again inside its transaction, so a key revoked a
//! moment ago still fails at once.
use deadpool_postgres::Pool;
use polar_meter_rules::{keys, sqlstate};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::db::DbError;
use crate::problem::Problem;

/// Keys whose verdict is remembered at most; past it expired entries go,
/// and if none had expired, all of them (a flood of made-up keys costs one
/// verification each, never memory).
const MAX_ENTRIES: usize = 50_000;

struct Entry {
    until: Instant,
    refusal: Option<Problem>,
    /// A request is verifying this expired good key again; meanwhile the
    /// others are admitted on the old verdict rather than all asking at once.
    refreshing: bool,
}

pub struct Admission {
    pool: Pool,
    ok_ttl: Duration,
    bad_ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

/// Refusals that belong to the key, and so may be remembered for it.
fn key_refusal(code: &str) -> bool {
    [
        sqlstate::KEY_MALFORMED,
        sqlstate::KEY_UNKNOWN,
        sqlstate::KEY_REVOKED,
        sqlstate::KEY_EXPIRED,
        sqlstate::KEY_PERMISSION,
    ]
    .contains(&code)
}

impl Admission {
    pub fn new(pool: Pool, ok_ttl: Duration, bad_ttl: Duration) -> Self {
        Admission {
            pool,
            ok_ttl,
            bad_ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a key that may record events (`fence:meter`), or says why not.
    pub async fn admit(&self, key: &str) -> Result<(), Problem> {
        if !keys::is_wellformed(key) {
            return Err(Problem::from_sql(
                sqlstate::KEY_MALFORMED,
                "the API key is not ak_ followed by 48 base62 characters",
            ));
        }
        let hash = keys::hash(key);
        let now = Instant::now();
        if let Some(e) = self.entries.lock().unwrap().get_mut(&hash) {
            if e.until > now {
                return e.refusal.clone().map_or(Ok(()), Err);
            }
            // An expired good verdict: one request verifies again, the others
            // go on (every key's admission expiring at once under load would
            // otherwise send every request of that moment to the database).
            if e.refusal.is_none() {
                if e.refreshing {
                    return Ok(());
                }
                e.refreshing = true;
            }
        }
        let verdict = self.verify(key).await;
        let refusal = match &verdict {
            Ok(()) => None,
            Err(DbError::Sql { code, message }) if key_refusal(code) => {
                Some(Problem::from_sql(code, message))
            }
            // The database being away says nothing about the key: the next
            // request tries again.
            Err(e) => {
                e.log();
                if let Some(entry) = self.entries.lock().unwrap().get_mut(&hash) {
                    entry.refreshing = false;
                }
                return Err(Problem::from_db(e));
            }
        };
        let ttl = if refusal.is_some() {
            self.bad_ttl
        } else {
            self.ok_ttl
        };
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| e.until > now);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(
            hash,
            Entry {
                until: Instant::now() + ttl,
                refusal: refusal.clone(),
                refreshing: false,
            },
        );
        refusal.map_or(Ok(()), Err)
    }

    async fn verify(&self, key: &str) -> Result<(), DbError> {
        crate::store::record::verify_api_key(&self.pool, key, "fence:meter").await
    }

    /// Verdicts remembered now (for /metrics).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_keys_own_refusals_are_remembered() {
        for code in ["PM001", "PM002", "PM003", "PM004", "PM005"] {
            assert!(key_refusal(code), "{code}");
        }
        for code in ["PM006", "PM013", "57014", "08006", "XX000"] {
            assert!(!key_refusal(code), "{code}");
        }
    }
}
