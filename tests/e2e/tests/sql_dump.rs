//! pg_dump / pg_restore keeps every billing record: extension-owned tables are
//! registered with pg_extension_config_dump (pgmq's hard lesson).
use pm_e2e::Value1;
use pm_e2e::{connect, pg, TestDb};
use std::process::Command;

fn bin(name: &str) -> String {
    format!("/usr/lib/postgresql/15/bin/{name}")
}

#[tokio::test]
async fn dump_and_restore_round_trip_keeps_everything() {
    let (db, c) = TestDb::with_admin().await;
    db.org(&c, "acme").await;
    let (_, key) = db.key(&c, "acme", &["fence:meter"]).await;
    c.execute(
        "SELECT meter.record_event($1, 'k' || i, 'api.request', now(), jsonb_build_object('i', i)) FROM generate_series(1, 50) i",
        &[&key],
    )
    .await
    .unwrap();
    c.query_one("SELECT meter.seal_audit_log()", &[])
        .await
        .unwrap();
    c.execute(
        "SELECT meter.record_event($1, 'unsealed', 'api.request', now())",
        &[&key],
    )
    .await
    .unwrap();
    c.query_one("SELECT meter.reconcile_meter_to_polar()", &[])
        .await
        .unwrap();

    let snapshot = "SELECT (SELECT count(*) FROM meter.organization), (SELECT count(*) FROM meter.api_key),
        (SELECT count(*) FROM meter.meter_event), (SELECT count(*) FROM meter.audit_log),
        (SELECT count(*) FROM meter.audit_log WHERE row_hash IS NOT NULL), (SELECT count(*) FROM meter.reconcile_run),
        (SELECT md5(string_agg(e::text, ',' ORDER BY id)) FROM meter.meter_event e),
        (SELECT md5(string_agg(a::text, ',' ORDER BY id)) FROM meter.audit_log a)";
    let before = c.query_one(snapshot, &[]).await.unwrap();

    let file = std::env::temp_dir().join(format!("{}.dump", db.name));
    let port = pg::port().to_string();
    let host = pg::host();
    let out = Command::new(bin("pg_dump"))
        .args(["-h", &host, "-p", &port, "-U", "postgres", "-Fc", "-f"])
        .arg(&file)
        .arg(&db.name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let restored = format!("{}_r", db.name);
    connect("postgres", "postgres")
        .await
        .run(&format!("CREATE DATABASE {restored} TEMPLATE template0"))
        .await;
    let out = Command::new(bin("pg_restore"))
        .args([
            "-h",
            &host,
            "-p",
            &port,
            "-U",
            "postgres",
            "--exit-on-error",
            "-d",
            &restored,
        ])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "pg_restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let r = connect(&restored, "postgres").await;
    let after = r.query_one(snapshot, &[]).await.unwrap();
    for i in 0..6 {
        assert_eq!(
            before.get::<_, i64>(i),
            after.get::<_, i64>(i),
            "column {i}"
        );
    }
    assert_eq!(
        before.get::<_, String>(6),
        after.get::<_, String>(6),
        "meter_event rows identical"
    );
    assert_eq!(
        before.get::<_, String>(7),
        after.get::<_, String>(7),
        "audit rows identical"
    );
    // The restored database carries on: chain intact and extendable, keys
    // work, replays are still replays, sequences continue.
    let broken = r
        .query_one("SELECT (meter.verify_audit_chain()).id", &[])
        .await
        .unwrap();
    assert_eq!(broken.get::<_, Option<i64>>(0), None);
    // Two rows were unsealed at dump time: the last event and the reconcile request.
    assert_eq!(
        r.query_one("SELECT meter.seal_audit_log()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
    let replay = r
        .query_one(
            "SELECT status FROM meter.record_event($1, 'k7', 'api.request', now(), '{\"i\":7}')",
            &[&key],
        )
        .await;
    // Same key, new timestamp: a payload mismatch proves the original row and its fingerprint survived.
    assert_eq!(replay.unwrap_err().code().unwrap().code(), "PM020");
    let fresh = r
        .query_one(
            "SELECT status FROM meter.record_event($1, 'after-restore', 'e', now())",
            &[&key],
        )
        .await
        .unwrap();
    assert_eq!(fresh.get::<_, String>(0), "recorded");
    assert_eq!(
        r.query_one("SELECT meter.seal_audit_log()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    assert_eq!(
        r.query_one("SELECT (meter.verify_audit_chain()).id", &[])
            .await
            .unwrap()
            .get::<_, Option<i64>>(0),
        None
    );
    let run: i64 = r.value("SELECT meter.reconcile_meter_to_polar()").await;
    assert_eq!(run, 2, "sequence continued after restore");
}
