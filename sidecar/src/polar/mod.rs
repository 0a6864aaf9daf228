//! Everything about calling Polar: the client (answers classified once), the
//! shared rate budget, and whether Polar is usable now.
pub mod budget;
pub mod client;
pub mod health;

pub use budget::Budget;
pub use client::{check_base_url, redact, Answer, Client, Failure, Ingest, POLAR_VERSION};
pub use health::Health;
