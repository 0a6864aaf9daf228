//! The rules of polar-meter that need no database: each lives here once, the
//! extension exposes them to SQL (extension/src), the sidecar reads the error
//! table, and plain `cargo test` covers them.
pub mod backoff;
pub mod batch;
pub mod bounds;
pub mod drift;
pub mod ids;
pub mod keys;
pub mod settings;
pub mod sqlstate;
pub mod validate;

pub use sqlstate::Violation;
