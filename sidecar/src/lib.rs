//! polar-meterd: a thin sidecar in front of the polar_meter extension.
//! It serves the HTTP API (every request one SQL call; every rule lives in
//! the extension, and this crate maps its SQLSTATEs to HTTP) and makes the
//! Polar calls the database asks for (jobs/). docs/architecture.md follows
//! one event through both.
pub mod admission;
pub mod agent_config;
pub mod config;
pub mod db;
pub mod db_tls;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod polar;
pub mod problem;
pub mod recorder;
pub mod routes;
pub mod store;

/// Version of this binary.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The oldest polar_meter extension whose functions this binary calls
/// (/readyz requires at least this).
pub const MIN_EXTENSION: &str = "0.4.0";

/// What `--version` prints: this binary, the polar_meter extension it needs,
/// and the Polar API version it pins.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (polar_meter extension 0.4.0 or later, Polar-Version 2026-04)"
);
