//! Privilege paths a login role of polar_meter_sidecar could try, closed:
//! shadowing types in pg_temp to run code as the extension's owner,
//! widening a tunable for itself, truncating billing tables, minting keys
//! beyond its own rights.
use pm_e2e::Value1;
use pm_e2e::{sqlstate, TestDb};
use tokio_postgres::Client;

async fn login(db: &TestDb, admin: &Client) -> (String, Client) {
    let role = format!("att_{}", uuid::Uuid::new_v4().simple());
    admin
        .run(&format!(
            "CREATE ROLE {role} LOGIN IN ROLE polar_meter_sidecar"
        ))
        .await;
    let c = db.client_as(&role).await;
    (role, c)
}

#[tokio::test]
async fn every_security_definer_function_searches_pg_temp_last() {
    let (_db, c) = TestDb::with_admin().await;
    let rows = c
        .query(
            "SELECT p.oid::regprocedure::text, coalesce(array_to_string(p.proconfig, ' '), '')
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'meter' AND p.prosecdef ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    assert!(
        rows.len() > 40,
        "the check sees the functions: {}",
        rows.len()
    );
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| r.get::<_, String>(1) != "search_path=meter, pg_catalog, pg_temp")
        .map(|r| format!("{} [{}]", r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    assert!(
        bad.is_empty(),
        "SECURITY DEFINER without search_path = meter, pg_catalog, pg_temp: {bad:#?}"
    );
}

/// Types the functions use, each shadowed by a pg_temp domain whose CHECK
/// tries to make the caller superuser: PostgreSQL searches the temporary
/// schema first unless the function's search_path names it last.
const SHADOWED: [&str; 14] = [
    "text",
    "bytea",
    "uuid",
    "jsonb",
    "timestamptz",
    "date",
    "float8",
    "int4",
    "int8",
    "bool",
    "name",
    "xid8",
    "oid",
    "regclass",
];

/// Every function the sidecar's role may execute, called with arguments that
/// take it past its checks into the code that declares and casts.
fn calls(key: &str, admin_key: &str) -> Vec<(&'static str, String)> {
    let ts = "2026-01-01T00:00:00Z";
    vec![
        ("verify_api_key", format!("SELECT * FROM meter.verify_api_key('{key}', 'fence:meter')")),
        ("record_events", format!(
            "SELECT * FROM meter.record_events('{key}', '[{{\"idempotency_key\":\"a3\",\"event_name\":\"e\",\"event_timestamp\":\"{ts}\"}}]')"
        )),
        ("create_own_api_key", format!("SELECT * FROM meter.create_own_api_key('{admin_key}', 'x', '{{fence:meter}}', now() + interval '1 day')")),
        ("list_own_api_keys", format!("SELECT * FROM meter.list_own_api_keys('{admin_key}')")),
        ("revoke_own_api_key", format!(
            "SELECT meter.revoke_own_api_key('{admin_key}', (SELECT id FROM meter.list_own_api_keys('{admin_key}') WHERE name = 'x'))"
        )),
        ("extension_version", "SELECT meter.extension_version()".into()),
        ("oldest_supported_sidecar", "SELECT meter.oldest_supported_sidecar()".into()),
        ("outbox_stats", "SELECT meter.outbox_stats()".into()),
        ("due_organizations", "SELECT * FROM meter.due_organizations(10)".into()),
        ("claim_delivery", "SELECT * FROM meter.claim_delivery('acme', 1, '1 minute')".into()),
        ("claim_events", "SELECT * FROM meter.claim_events('acme', 1, '1 minute')".into()),
        ("delivery_sent", "SELECT meter.delivery_sent('acme', b, ARRAY[e]) FROM (SELECT batch_id b, event_id e FROM meter.claim_delivery('acme', 1, '1 minute')) x".into()),
        ("delivery_deferred", "SELECT meter.delivery_deferred('acme', b, ARRAY[e], '1 second') FROM (SELECT batch_id b, event_id e FROM meter.claim_delivery('acme', 1, '1 minute')) x".into()),
        ("delivery_failed", "SELECT * FROM (SELECT batch_id b, event_id e FROM meter.claim_delivery('acme', 1, '1 minute')) x, meter.delivery_failed('acme', b, ARRAY[e], 'boom') f".into()),
        ("delivery_unconfirmed", "SELECT * FROM meter.delivery_unconfirmed('acme', gen_random_uuid(), ARRAY[gen_random_uuid()], 'odd')".into()),
        ("delivery_rejected", "SELECT meter.delivery_rejected('acme', gen_random_uuid(), ARRAY[gen_random_uuid()], 'no')".into()),
        ("delivery_too_early", "SELECT meter.delivery_too_early('acme', gen_random_uuid(), ARRAY[gen_random_uuid()], 'future')".into()),
        ("take_polar_slot", "SELECT meter.take_polar_slot(6000)".into()),
        ("pause_polar", "SELECT meter.pause_polar('1 millisecond')".into()),
        ("polar_unavailable", "SELECT meter.polar_unavailable('test', '{}')".into()),
        ("polar_available", "SELECT meter.polar_available()".into()),
        ("claim_provisioning", "SELECT * FROM meter.claim_provisioning(5, '1 minute')".into()),
        ("customer_provisioned", "SELECT meter.customer_provisioned('globex', 'cus_1')".into()),
        ("customer_synced", "SELECT meter.customer_synced('globex', 1)".into()),
        ("provisioning_failed", "SELECT meter.provisioning_failed('acme', 'no')".into()),
        ("backfill_polar_customers", "SELECT meter.backfill_polar_customers()".into()),
        ("reconcile_meter_to_polar", "SELECT meter.reconcile_meter_to_polar(now(), '1 day', 'counts')".into()),
        ("claim_reconcile_run", "SELECT * FROM meter.claim_reconcile_run('1 minute', NULL)".into()),
        ("reconcile_count_plan", "SELECT * FROM meter.reconcile_count_plan((SELECT max(id) FROM meter.claim_reconcile_run('1 minute', NULL)))".into()),
        ("reconcile_add_counts", "SELECT meter.reconcile_add_counts(r, '[{\"organization_id\": null, \"event_name\": null, \"remote\": 0}]') FROM (SELECT run_id r FROM meter.claim_reconcile_run('1 minute', NULL)) x".into()),
        ("reconcile_list_plan", "SELECT * FROM (SELECT run_id r FROM meter.claim_reconcile_run('1 minute', NULL)) x, meter.reconcile_list_plan(r) p".into()),
        ("reconcile_add_remote", "SELECT meter.reconcile_add_remote(r, NULL, NULL, 1, '[]') FROM (SELECT run_id r FROM meter.claim_reconcile_run('1 minute', NULL)) x".into()),
        ("reconcile_add_listed", "SELECT meter.reconcile_add_listed(r, NULL, NULL, 1, ARRAY['p1'], ARRAY['acme'], ARRAY[gen_random_uuid()], ARRAY['e'], ARRAY[now()]) FROM (SELECT run_id r FROM meter.claim_reconcile_run('1 minute', NULL)) x".into()),
        ("reconcile_finish", "SELECT meter.reconcile_finish(r) FROM (SELECT run_id r FROM meter.claim_reconcile_run('1 minute', NULL)) x".into()),
        ("reconcile_failed", "SELECT meter.reconcile_failed(r, 'no') FROM (SELECT run_id r FROM meter.claim_reconcile_run('1 minute', NULL)) x".into()),
        ("claim_alerts", "SELECT * FROM meter.claim_alerts(10, '1 minute')".into()),
        ("alert_forwarded", "SELECT meter.alert_forwarded(organization_id, alert_id) FROM meter.claim_alerts(1, '1 minute')".into()),
        ("alert_forward_failed", "SELECT meter.alert_forward_failed(organization_id, alert_id, 'no') FROM meter.claim_alerts(1, '1 minute')".into()),
    ]
}

#[tokio::test]
async fn an_execute_only_role_gains_nothing_by_shadowing_types_in_pg_temp() {
    let (db, admin) = TestDb::with_admin().await;
    db.org(&admin, "acme").await;
    db.org(&admin, "globex").await;
    admin
        .run("UPDATE meter.organization SET polar_customer_id = 'cus_acme' WHERE id = 'acme'")
        .await;
    let (_, key) = db.key(&admin, "acme", &["fence:meter"]).await;
    let (_, admin_key) = db
        .key(&admin, "acme", &["fence:meter", "keys:manage"])
        .await;
    admin
        .execute("SELECT meter.record_event_for_org('acme', 'seed' || i, 'e', now()) FROM generate_series(1, 5) i", &[])
        .await
        .unwrap();
    let (role, att) = login(&db, &admin).await;
    let before = table_digest(&admin).await;

    // The trap: any use of a shadowed type as the owner runs this as the owner.
    att.batch_execute(&format!(
        "CREATE TEMP TABLE hits (who text);
         CREATE FUNCTION pg_temp.own() RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO pg_temp.hits VALUES (current_user);
             EXECUTE 'ALTER ROLE {role} SUPERUSER';
             RETURN true;
         END $$;"
    ))
    .await
    .unwrap();
    for t in SHADOWED {
        att.batch_execute(&format!(
            "CREATE DOMAIN pg_temp.{t} AS pg_catalog.{t} CHECK (pg_temp.own())"
        ))
        .await
        .unwrap_or_else(|e| panic!("shadowing {t}: {e}"));
    }

    let granted: std::collections::BTreeSet<String> = admin
        .query(
            "SELECT DISTINCT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'meter' AND has_function_privilege($1, p.oid, 'EXECUTE')",
            &[&role],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let calls = calls(&key, &admin_key);
    let called: std::collections::BTreeSet<String> =
        calls.iter().map(|c| c.0.to_string()).collect();
    assert_eq!(
        called, granted,
        "every function the role may execute is attacked"
    );
    let mut succeeded = 0;
    for (name, sql) in &calls {
        match att.batch_execute(sql).await {
            Ok(()) => succeeded += 1,
            // A refusal is fine (an argument the function rejects); running
            // the trap is not, and is checked below.
            Err(e) => assert!(e.code().is_some(), "{name}: {e}"),
        }
    }
    assert!(
        succeeded >= 30,
        "most calls ran through: {succeeded} of {}",
        calls.len()
    );
    let hits: i64 = att.value("SELECT count(*) FROM pg_temp.hits").await;
    assert_eq!(
        hits, 0,
        "no shadowed type was ever used by the extension's code"
    );
    let superuser: bool = admin
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .unwrap()
        .get(0);
    assert!(!superuser, "the role is still not superuser");
    // Nothing it could not change before changed: the roles, and the tables
    // the functions do not write on its behalf.
    assert_eq!(table_digest(&admin).await, before);
}

/// What no sidecar call may change: roles and their rights, settings, keys'
/// permissions, the audit log's sealed part.
async fn table_digest(c: &Client) -> String {
    c.query_one(
        "SELECT md5(concat_ws('|',
            (SELECT string_agg(rolname || rolsuper || rolcreaterole || rolcreatedb || rolbypassrls, ',' ORDER BY rolname) FROM pg_roles),
            (SELECT string_agg(name || value, ',' ORDER BY name) FROM meter.setting_value),
            (SELECT string_agg(id::text || permissions::text, ',' ORDER BY id) FROM meter.api_key WHERE name <> 'x'),
            (SELECT string_agg(id::text || row_hash::text, ',' ORDER BY id) FROM meter.audit_log WHERE row_hash IS NOT NULL)))",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn the_sidecar_role_cannot_widen_any_tunable() {
    let (db, admin) = TestDb::with_admin().await;
    db.org(&admin, "acme").await;
    let (_, key) = db.key(&admin, "acme", &["fence:meter"]).await;
    let (role, att) = login(&db, &admin).await;
    let future = (chrono::Utc::now() + chrono::Duration::days(3650)).to_rfc3339();
    // The 0.2 way, in the session: a placeholder GUC nobody reads any more.
    att.run("SET polar_meter.max_future_skew = '100 years'")
        .await;
    assert_eq!(record_future(&att, &key, "f1", &future).await, "PM012");
    // Every other way in: the function, the table, the role's defaults.
    for name in polar_meter_settings(&admin).await {
        assert_eq!(
            sqlstate(
                att.query_one("SELECT meter.set_setting($1, '0')", &[&name])
                    .await
            ),
            "42501",
            "{name}"
        );
    }
    assert_eq!(
        sqlstate(att.execute("INSERT INTO meter.setting_value (name, value) VALUES ('max_future_skew', '100 years')", &[]).await),
        "42501"
    );
    let _ = att
        .batch_execute(&format!(
            "ALTER ROLE {role} SET polar_meter.max_future_skew = '100 years'"
        ))
        .await;
    let again = db.client_as(&role).await;
    assert_eq!(record_future(&again, &key, "f2", &future).await, "PM012");
    let n: i64 = admin.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(n, 0, "nothing from the future was billed");
    // An admin can, within the bounds.
    assert_eq!(
        sqlstate(
            admin
                .query_one(
                    "SELECT meter.set_setting('max_future_skew', '100 years')",
                    &[]
                )
                .await
        ),
        "PM039"
    );
    assert_eq!(
        sqlstate(
            admin
                .query_one("SELECT meter.set_setting('nope', '1')", &[])
                .await
        ),
        "PM038"
    );
    db.set(&admin, "max_future_skew", "10 seconds").await;
}

async fn polar_meter_settings(c: &Client) -> Vec<String> {
    c.column("SELECT name FROM meter.settings()").await
}

async fn record_future(c: &Client, key: &str, idem: &str, ts: &str) -> String {
    c.query_one(
        "SELECT coalesce(sqlstate, status) FROM meter.record_events($1, jsonb_build_array(
             jsonb_build_object('idempotency_key', $2::text, 'event_name', 'e', 'event_timestamp', $3::text)))",
        &[&key, &idem, &ts],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn no_table_can_be_truncated_and_billing_rows_are_never_deleted() {
    let (db, c) = TestDb::with_admin().await;
    db.org(&c, "acme").await;
    db.key(&c, "acme", &["fence:meter"]).await;
    c.run("SELECT meter.record_event_for_org('acme', 'k', 'e', now()); SELECT meter._alert('test', 'acme', '{}')").await;
    let tables: Vec<String> = c
        .column("SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'meter' AND c.relkind = 'r' ORDER BY 1").await;
    assert!(tables.len() >= 15, "{tables:?}");
    for t in &tables {
        assert_eq!(
            sqlstate(c.execute(&format!("TRUNCATE {t} CASCADE"), &[]).await),
            "PM042",
            "{t}"
        );
    }
    for t in [
        "meter.organization",
        "meter.api_key",
        "meter.meter_event",
        "meter.alert",
    ] {
        assert_eq!(
            sqlstate(c.execute(&format!("DELETE FROM {t}"), &[]).await),
            "PM041",
            "{t}"
        );
    }
}

#[tokio::test]
async fn permissions_hold_no_null_and_a_missing_permission_fails_closed() {
    let (db, c) = TestDb::with_admin().await;
    db.org(&c, "acme").await;
    let (id, key) = db.key(&c, "acme", &["fence:meter"]).await;
    assert_eq!(
        sqlstate(
            c.query(
                "SELECT * FROM meter.create_api_key('acme', 'k', ARRAY['fence:meter', NULL])",
                &[]
            )
            .await
        ),
        "PM031"
    );
    assert_eq!(
        sqlstate(
            c.execute(
                "UPDATE meter.api_key SET permissions = ARRAY['keys:manage', NULL] WHERE id = $1",
                &[&id]
            )
            .await
        ),
        "23514",
        "the CHECK keeps NULLs out even of direct writes"
    );
    assert_eq!(
        sqlstate(
            c.query("SELECT * FROM meter.verify_api_key($1, NULL)", &[&key])
                .await
        ),
        "PM005"
    );
    assert_eq!(
        sqlstate(
            c.query(
                "SELECT * FROM meter.verify_api_key($1, 'keys:manage')",
                &[&key]
            )
            .await
        ),
        "PM005"
    );
}
