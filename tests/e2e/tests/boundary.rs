//! The boundary between the sidecar and the extension: the sidecar calls
//! exactly the functions its role is granted (sidecar/src/store), it reads
//! outbox_stats() into a struct that knows every key, the extension holds
//! no Polar format outside the deprecated 0.3 wrappers, and a rolling
//! upgrade works both ways: a 0.3.0 sidecar delivers and reconciles against a
//! database upgraded to 0.4.0, and a 0.4.0 sidecar needs none of the
//! functions kept for it.
use pm_e2e::{
    database_at, eventually, reconcile_done, record_many, statuses, target_dir, Emulator, Sidecar,
    TestDb, Value1,
};
use polar_meterd::store::stats::OutboxStats;
use polar_meterd::store::{DEPRECATED, FUNCTIONS};
use std::collections::BTreeSet;
use tokio_postgres::Client;

#[tokio::test]
async fn the_sidecar_is_granted_exactly_what_its_store_calls() {
    let (_db, pg) = TestDb::with_admin().await;
    let granted: BTreeSet<String> = pg
        .column(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
             JOIN pg_namespace n ON n.oid = p.pronamespace AND n.nspname = 'meter'
             WHERE has_function_privilege('polar_meter_sidecar', p.oid, 'EXECUTE')",
        )
        .await
        .into_iter()
        .collect();
    let called: BTreeSet<String> = FUNCTIONS.iter().map(|f| f.to_string()).collect();
    let kept: BTreeSet<String> = DEPRECATED.iter().map(|f| f.to_string()).collect();
    assert!(called.is_disjoint(&kept));
    let expected: BTreeSet<String> = called.union(&kept).cloned().collect();
    assert_eq!(
        granted,
        expected,
        "granted but not called: {:?}; called but not granted: {:?}",
        granted.difference(&expected).collect::<Vec<_>>(),
        expected.difference(&granted).collect::<Vec<_>>()
    );
    // Each deprecated function says so, and when it goes.
    for f in DEPRECATED {
        let comment: String = pg
            .value(&format!(
                "SELECT obj_description('{f}'::regprocedure, 'pg_proc')"
            ))
            .await;
        assert!(
            comment.starts_with("Deprecated since 0.4.0, removed in 0.5.0"),
            "{f}: {comment}"
        );
    }
}

/// outbox_stats() as the sidecar reads it: every key it returns is a field
/// of OutboxStats and every field is a key (a renamed key fails to parse).
#[tokio::test]
async fn outbox_stats_parses_into_the_sidecars_struct_key_for_key() {
    let (db, pg, key) = TestDb::acme().await;
    let emu = Emulator::start(&[]).await;
    let side = Sidecar::start_with(&db, &emu.sidecar_env()).await;
    record_many(&side, &[("acme".into(), key)], 3, 3).await;
    eventually(30, "delivered", || async {
        (statuses(&pg).await.get("sent") == Some(&3)).then_some(())
    })
    .await;
    let id: i64 = pg
        .value(
            "SELECT meter.reconcile_meter_to_polar(now() + interval '1 minute', '1 hour', 'full')",
        )
        .await;
    reconcile_done(&pg, id, 60).await;
    let raw: serde_json::Value = pg.value("SELECT meter.outbox_stats()").await;
    let stats = OutboxStats::parse(raw.clone()).unwrap_or_else(|e| panic!("{e}: {raw}"));
    assert!(stats.last_reconcile.is_some(), "{raw}");
    assert_eq!(stats.backlog.pending, 0);
    // The same key renamed is refused, not read as zero.
    let mut renamed = raw.as_object().unwrap().clone();
    let v = renamed.remove("alerts_pending").unwrap();
    renamed.insert("alerts_waiting".into(), v);
    let e = OutboxStats::parse(serde_json::Value::Object(renamed)).unwrap_err();
    assert!(e.to_string().contains("alerts_waiting"), "{e}");
}

/// Function bodies in schema meter, comments stripped, by name.
async fn bodies(pg: &Client) -> Vec<(String, String)> {
    pg.query(
        "SELECT p.oid::regprocedure::text, p.prosrc FROM pg_proc p
         JOIN pg_namespace n ON n.oid = p.pronamespace AND n.nspname = 'meter'
         WHERE p.prolang <> (SELECT oid FROM pg_language WHERE lanname = 'c')",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let src: String = r.get(1);
        let code: String = src
            .lines()
            .map(|l| l.split("--").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        (r.get(0), code)
    })
    .collect()
}

#[tokio::test]
async fn the_extension_holds_no_polar_format_outside_the_deprecated_wrappers() {
    let (_db, pg) = TestDb::with_admin().await;
    // Field names of Polar's event body and event list (EventCreateExternalCustomer,
    // ListResource[Event]) that mean nothing in our own schema.
    let polar = [
        "external_customer_id",
        "'customer'->>'external_id'",
        "'pagination'",
        "max_page",
        "total_count",
    ];
    let all = bodies(&pg).await;
    let mut found = Vec::new();
    for (f, code) in &all {
        if DEPRECATED.contains(&f.as_str()) {
            continue;
        }
        for word in polar {
            if code.contains(word) {
                found.push(format!("{f}: {word}"));
            }
        }
    }
    assert!(
        found.is_empty(),
        "Polar's format in the extension: {found:?}"
    );
    // The check can fail: the wrappers it skips do hold Polar's format.
    for d in DEPRECATED {
        let (_, code) = all.iter().find(|(f, _)| f == d).expect(d);
        assert!(polar.iter().any(|w| code.contains(w)), "{d}");
    }
}

/// Delivery, then a full reconcile run, through `side`: every event at the
/// emulator once, the run clean.
async fn delivers_and_reconciles(
    pg: &Client,
    side: &Sidecar,
    emu: &Emulator,
    key: String,
    n: usize,
) {
    record_many(side, &[("acme".into(), key)], n, 8).await;
    eventually(60, "every event sent", || async {
        (statuses(pg).await.get("sent") == Some(&(n as i64))).then_some(())
    })
    .await;
    let at_polar = emu.events().await["events"].as_array().unwrap().len();
    assert_eq!(at_polar, n);
    let id: i64 = pg
        .value(
            "SELECT meter.reconcile_meter_to_polar(now() + interval '1 minute', '1 hour', 'full')",
        )
        .await;
    let result = reconcile_done(pg, id, 60).await;
    assert_eq!(result["drift"], 0, "{result}");
    assert_eq!(result["local_sent"], n as i64, "{result}");
    assert_eq!(result["remote_listed"], n as i64, "{result}");
    assert_eq!(result["missing_at_polar"]["count"], 0, "{result}");
}

#[tokio::test]
async fn a_sidecar_of_this_release_needs_no_deprecated_function() {
    let (db, pg, key) = TestDb::acme().await;
    // Taken from the sidecar's role in this database only: a call would fail.
    for f in DEPRECATED {
        pg.run(&format!(
            "REVOKE EXECUTE ON FUNCTION {f} FROM polar_meter_sidecar"
        ))
        .await;
    }
    let emu = Emulator::start(&[]).await;
    let side = Sidecar::start_with(&db, &emu.sidecar_env()).await;
    delivers_and_reconciles(&pg, &side, &emu, key, 40).await;
    assert!(!side.logs_text().contains("permission denied"));
}

/// Rolling upgrades (extension first, then sidecars): a 0.3.0 sidecar keeps
/// delivering and reconciling against a database upgraded to 0.4.0, through
/// the wrappers kept for it. scripts/test.sh builds that sidecar from the
/// 0.3.0 release's commit.
#[tokio::test]
async fn a_0_3_0_sidecar_delivers_and_reconciles_against_an_upgraded_database() {
    let bin = target_dir().join("compat/polar-meterd-0.3.0");
    assert!(
        bin.exists(),
        "{} is not built; scripts/test.sh builds it (make test)",
        bin.display()
    );
    let (name, pg) = database_at(Some("0.3.0")).await;
    pg.run("ALTER EXTENSION polar_meter UPDATE").await;
    let v: String = pg
        .value("SELECT extversion FROM pg_extension WHERE extname = 'polar_meter'")
        .await;
    assert_eq!(v, "0.4.0");
    pg.run("SELECT meter.upsert_organization('acme', 'acme', 'acme@example.org')")
        .await;
    let key: String = pg
        .value("SELECT key FROM meter.create_api_key('acme', 'fence', '{fence:meter}')")
        .await;
    let emu = Emulator::start(&[]).await;
    let role = pm_e2e::sidecar_role(&name, pm_e2e::pg::port()).await;
    let url = format!(
        "postgres://{role}@{}:{}/{name}",
        pm_e2e::pg::host(),
        pm_e2e::pg::port()
    );
    let env = emu.sidecar_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let side = Sidecar::start_binary(&bin, &url, &env).await;
    let version: serde_json::Value = pm_e2e::http()
        .get(side.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(version["version"], "0.3.0", "{version}");
    assert_eq!(version["status"], "ready", "{version}");
    delivers_and_reconciles(&pg, &side, &emu, key, 40).await;
}
