//! polar-emulator: the subset of Polar's API that polar-meter uses, with
//! Polar's behaviour (docs/polar.md), not a happy-path fake:
//! organization tokens and their scopes, Polar-Version, ingest validation with all-or-nothing
//! 422s, external_id dedup per organization forever, the events list's
//! exclusive bounds and page pagination, team customers with immutable
//! external ids, per-organization rate limits with empty 429s, and injected
//! faults. `/__admin/*` lets tests see and change what it holds.
// Handlers return a finished error response as `Err`; boxing it buys nothing here.
#![allow(clippy::result_large_err)]
pub mod api;
pub mod store;
pub mod validate;
