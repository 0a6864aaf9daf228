//! ALTER EXTENSION polar_meter UPDATE from every earlier release. Their
//! install scripts are frozen in tests/upgrade/ (scripts/test.sh installs them
//! beside the current one). An upgraded database must be indistinguishable
//! from a fresh install, and keep every record working; a database still on
//! the previous release's catalog must also keep working on this library
//! until it is upgraded (extension/src/compat.rs).
use pm_e2e::Value1;
use pm_e2e::{connect, database_at, sqlstate};
use std::collections::BTreeSet;
use tokio_postgres::Client;

/// The release whose GUCs and global audit chain the records test upgrades.
const PREVIOUS: &str = "0.2.0";
const RELEASES: [&str; 3] = ["0.1.0", "0.2.0", "0.3.0"];

/// Everything the extension consists of in one database, as text lines:
/// each member object with its definition, comment and privileges, and the
/// tables' columns, constraints, indexes, triggers and dump registration.
async fn catalog(c: &Client) -> BTreeSet<String> {
    let queries = [
        // Member objects; functions with their full definition (body,
        // volatility, SECURITY DEFINER, search_path).
        "SELECT pg_describe_object(d.classid, d.objid, 0)
                || coalesce(' ' || pg_get_functiondef(p.oid), '')
                || ' comment=' || coalesce(obj_description(d.objid, cl.relname), '-')
                || ' acl=' || coalesce(p.proacl::text, r.relacl::text, t.typacl::text, '-')
         FROM pg_depend d
         JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'polar_meter'
         JOIN pg_class cl ON cl.oid = d.classid
         LEFT JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid AND p.prokind IN ('f', 'p')
         LEFT JOIN pg_class r ON d.classid = 'pg_class'::regclass AND r.oid = d.objid
         LEFT JOIN pg_type t ON d.classid = 'pg_type'::regclass AND t.oid = d.objid
         WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'",
        "SELECT format('column %s.%s %s notnull=%s default=%s comment=%s', c.relname, a.attname,
                       format_type(a.atttypid, a.atttypmod), a.attnotnull,
                       pg_get_expr(ad.adbin, ad.adrelid), col_description(c.oid, a.attnum))
         FROM pg_attribute a
         JOIN pg_class c ON c.oid = a.attrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'meter'
         LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
         WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'c')",
        "SELECT format('constraint %s %s %s', c.conrelid::regclass, c.conname, pg_get_constraintdef(c.oid))
         FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace AND n.nspname = 'meter'",
        "SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'meter'",
        "SELECT 'trigger ' || pg_get_triggerdef(t.oid)
         FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'meter'
         WHERE NOT t.tgisinternal",
        "SELECT format('dumped %s where %s', cfg::regclass, cond)
         FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS u(cfg, cond)
         WHERE e.extname = 'polar_meter'",
        "SELECT 'schema acl ' || nspacl::text FROM pg_namespace WHERE nspname = 'meter'",
    ];
    let mut out = BTreeSet::new();
    for q in queries {
        for row in c.query(q, &[]).await.unwrap() {
            out.insert(row.get::<_, String>(0));
        }
    }
    out
}

#[tokio::test]
async fn every_release_upgrades_to_exactly_a_fresh_install() {
    let (_, fresh) = database_at(None).await;
    let want = catalog(&fresh).await;
    assert!(
        want.len() > 100,
        "the comparison sees the objects: {}",
        want.len()
    );
    for release in RELEASES {
        let (_, upgraded) = database_at(Some(release)).await;
        let before = catalog(&upgraded).await;
        upgraded.run("ALTER EXTENSION polar_meter UPDATE").await;
        let version: String = upgraded.value("SELECT meter.extension_version()").await;
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        let got = catalog(&upgraded).await;
        assert_ne!(
            before, want,
            "{release} differs, so the scripts had work to do"
        );
        let missing: Vec<_> = want.difference(&got).collect();
        let extra: Vec<_> = got.difference(&want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{release} upgraded differs from a fresh install:\nmissing {missing:#?}\nextra {extra:#?}"
        );
    }
}

#[tokio::test]
async fn records_made_before_the_upgrade_keep_working_after_it() {
    let (name, c) = database_at(Some(PREVIOUS)).await;
    c.run("INSERT INTO meter.organization (id, name) VALUES ('acme', 'Acme')")
        .await;
    let key: String = c
        .value("SELECT key FROM meter.create_api_key('acme', 'fence', '{fence:meter}')")
        .await;
    let first: uuid::Uuid = c
        .query_one(
            "SELECT event_id FROM meter.record_event($1, 'k1', 'api.request', now(), '{\"n\": 1}')",
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    // One row sealed into the old global chain, one still unsealed at the
    // upgrade; a tunable set the old way, for this database.
    c.run("SELECT meter.seal_audit_log()").await;
    c.query_one(
        "SELECT event_id FROM meter.record_event($1, 'k0', 'api.request', now(), '{}')",
        &[&key],
    )
    .await
    .unwrap();
    c.run(&format!(
        "ALTER DATABASE {name} SET polar_meter.max_future_skew = '10 seconds'"
    ))
    .await;
    drop(c);
    let c = connect(&name, "postgres").await;
    c.run("ALTER EXTENSION polar_meter UPDATE").await;
    let skew: String = c
        .value("SELECT value FROM meter.settings() WHERE name = 'max_future_skew'")
        .await;
    assert_eq!(
        skew, "10 seconds",
        "the old GUC moved into meter.setting_value"
    );
    drop(c);

    // A new session, as the sidecar would open after the upgrade: the old
    // row is still found by its idempotency key, for a replay and a mismatch.
    let c = connect(&name, "postgres").await;
    let replay = c
        .query_one(
            "SELECT status, event_id FROM meter.record_event($1, 'k1', 'api.request',
                 (SELECT event_timestamp FROM meter.meter_event WHERE idempotency_key = 'k1'), '{\"n\": 1}')",
            &[&key],
        )
        .await
        .unwrap();
    assert_eq!(replay.get::<_, String>(0), "already_recorded");
    assert_eq!(replay.get::<_, uuid::Uuid>(1), first);
    let mismatch = c
        .query_one(
            "SELECT status FROM meter.record_event($1, 'k1', 'api.request', now(), '{\"n\": 2}')",
            &[&key],
        )
        .await;
    assert_eq!(sqlstate(mismatch), "PM020");
    let rotated: String = c
        .value("SELECT r.key FROM meter.api_key k, meter.rotate_api_key(k.id) r WHERE k.name = 'fence'").await;
    let second: String = c
        .query_one(
            "SELECT status FROM meter.record_event($1, 'k2', 'api.request', now(), '{}')",
            &[&rotated],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(second, "recorded");
    c.run("SELECT meter.seal_audit_log()").await;
    let broken = c
        .query_one("SELECT problem FROM meter.verify_audit_chain()", &[])
        .await
        .unwrap();
    assert_eq!(
        broken.get::<_, Option<String>>(0),
        None,
        "the audit chain spans the upgrade unbroken: the frozen global chain, then the organization's"
    );
    let (legacy, chained): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*) FILTER (WHERE seq IS NULL AND row_hash IS NOT NULL), count(*) FILTER (WHERE seq IS NOT NULL)
                 FROM meter.audit_log",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(legacy, 2, "the key and the first event, sealed by 0.2");
    assert!(
        chained >= 3,
        "the row unsealed at the upgrade joined the organization's chain"
    );
    // The frozen segment is still checked.
    c.batch_execute(
        "ALTER TABLE meter.audit_log DISABLE TRIGGER USER;
         UPDATE meter.audit_log SET detail = '{}' WHERE id = (SELECT min(id) FROM meter.audit_log);
         ALTER TABLE meter.audit_log ENABLE TRIGGER USER;",
    )
    .await
    .unwrap();
    let broken: Option<String> = c
        .value("SELECT problem FROM meter.verify_audit_chain()")
        .await;
    assert!(
        broken.is_some_and(|p| p.contains("altered")),
        "tampering in the legacy segment is found"
    );
}
