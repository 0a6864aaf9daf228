//! Drift math (polar_meter_rules::drift), used by compute_drift (drift.sql)
//! and reconcile_finish (reconcile.sql).
use pgrx::prelude::*;
use pgrx::JsonB;
use polar_meter_rules::drift;

/// NULL when both sides are well formed, else the violation.
#[pg_extern(immutable, strict, parallel_safe)]
fn _drift_violation(local: JsonB, remote: JsonB) -> Option<Vec<String>> {
    drift::compute(&local.0, &remote.0)
        .err()
        .map(crate::errors::violation)
}

/// The drift of two well-formed sides (NULL otherwise: check first).
#[pg_extern(immutable, strict, parallel_safe)]
fn _drift(local: JsonB, remote: JsonB) -> Option<JsonB> {
    drift::compute(&local.0, &remote.0).ok().map(JsonB)
}
