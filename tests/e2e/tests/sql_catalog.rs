//! What the extension installs: every function documented, every data table
//! kept by pg_dump, nothing granted to PUBLIC.
use pm_e2e::TestDb;
use pm_e2e::Value1;

#[tokio::test]
async fn every_function_in_meter_has_a_comment() {
    let (_db, c) = TestDb::with_admin().await;
    let missing: Vec<String> = c
        .column("SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'meter' AND coalesce(obj_description(p.oid, 'pg_proc'), '') = '' ORDER BY 1").await;
    assert!(
        missing.is_empty(),
        "functions without a COMMENT: {missing:?}"
    );
    let n: i64 = c
        .value("SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'meter'").await;
    assert!(n > 40, "the check saw the functions ({n})");
}

#[tokio::test]
async fn every_table_and_sequence_is_dumped_and_private() {
    let (_db, c) = TestDb::with_admin().await;
    let undumped: Vec<String> = c
        .column("SELECT cl.oid::regclass::text FROM pg_class cl JOIN pg_namespace n ON n.oid = cl.relnamespace
             WHERE n.nspname = 'meter' AND cl.relkind IN ('r', 'S')
               AND cl.oid <> ALL (SELECT unnest(extconfig) FROM pg_extension WHERE extname = 'polar_meter')
             ORDER BY 1").await;
    assert!(
        undumped.is_empty(),
        "not registered with pg_extension_config_dump: {undumped:?}"
    );
    let public: i64 = c
        .value(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'meter' AND has_function_privilege('public', p.oid, 'EXECUTE')",
        )
        .await;
    assert_eq!(public, 0, "PUBLIC may execute nothing in meter");
}
