//! docs/sql-api.md is what the installed extension says: regenerate it with
//! scripts/sql-docs.sh after changing a function or its COMMENT.
use pm_e2e::Value1;
use pm_e2e::{repo_root, TestDb};

#[tokio::test]
async fn the_sql_api_reference_matches_the_installed_functions() {
    let (_db, c) = TestDb::with_admin().await;
    let query =
        std::fs::read_to_string(repo_root().join("tests/e2e/sql/sql_api_reference.sql")).unwrap();
    let generated: String = c.value(query.as_str()).await;
    let on_disk = std::fs::read_to_string(repo_root().join("docs/sql-api.md")).unwrap_or_default();
    assert!(
        on_disk.trim_end() == generated.trim_end(),
        "docs/sql-api.md is out of date: run scripts/sql-docs.sh (with the test cluster up)"
    );
    for name in [
        "record_event",
        "verify_api_key",
        "drain_meter_outbox",
        "reconcile_meter_to_polar",
        "compute_drift",
        "requeue_dropped",
    ] {
        assert!(
            on_disk.contains(&format!("## `{name}`")),
            "{name} documented"
        );
    }
}
