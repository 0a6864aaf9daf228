//! Drift math (pure, in polar_meter_rules::drift) and the reconciliation
//! entry points (drift.sql).
use pgrx::prelude::*;
use pgrx::JsonB;

pgrx::extension_sql_file!(
    "drift.sql",
    name = "drift",
    requires = ["audit", _compute_drift]
);

/// `{"ok": result}` or `{"error": message}`; the SQL wrapper raises the latter
/// with its own SQLSTATE.
#[pg_extern(immutable, strict, parallel_safe)]
fn _compute_drift(local: JsonB, remote: JsonB) -> JsonB {
    JsonB(
        match polar_meter_rules::drift::compute(&local.0, &remote.0) {
            Ok(v) => serde_json::json!({ "ok": v }),
            Err(e) => serde_json::json!({ "error": e.0 }),
        },
    )
}
