//! Everything about Polar itself, and nothing about the database: the
//! client (answers classified once), Polar's event formats translated to and
//! from ours, and whether Polar is usable now.
pub mod client;
pub mod events;
pub mod health;

pub use client::{check_base_url, redact, Answer, Client, Failure, Ingest, POLAR_VERSION};
pub use health::Health;
