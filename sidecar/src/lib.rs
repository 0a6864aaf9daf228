//! polar-meterd: a thin sidecar in front of the polar_meter extension.
//! Every HTTP request is one SQL function call; every rule (validation, key
//! checks, idempotency) lives in the extension, and this crate only maps its
//! SQLSTATEs to HTTP.
pub mod agent_config;
pub mod config;
pub mod db;
pub mod http;
pub mod metrics;
pub mod polar;
pub mod problem;
pub mod routes;
pub mod worker;

/// Version of this binary; /readyz requires the installed extension to match.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What `--version` prints: this binary, the polar_meter extension it needs,
/// and the Polar API version it pins.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (polar_meter extension ",
    env!("CARGO_PKG_VERSION"),
    ", Polar-Version 2026-04)"
);
