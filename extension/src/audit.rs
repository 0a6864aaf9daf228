//! The audit chain's hashing: row i's hash is sha256(hash of row i-1 ||
//! canonical text of row i). The canonical text is SQL's (`meter._audit_text`,
//! audit.sql), so that the sealer and the verifier share one definition.
use pgrx::prelude::*;
use sha2::{Digest, Sha256};

/// The hashes of `texts` chained after `prev`, in order (NULL texts chain as '').
#[pg_extern(immutable, parallel_safe)]
fn _audit_chain_hashes(prev: Option<&[u8]>, texts: Vec<Option<String>>) -> Vec<Vec<u8>> {
    let mut prev = prev.unwrap_or_default().to_vec();
    texts
        .into_iter()
        .map(|t| {
            let mut h = Sha256::new();
            h.update(&prev);
            h.update(t.unwrap_or_default().as_bytes());
            prev = h.finalize().to_vec();
            prev.clone()
        })
        .collect()
}
