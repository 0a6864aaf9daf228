//! Organization -> Polar team customer: created once, recovered when it
//! already exists, and backfilled in bulk.
use pm_e2e::Value1;
use pm_e2e::{customer_id, eventually, http, meterd_cli, Emulator, Sidecar, TestDb};

#[tokio::test]
async fn a_new_org_gets_one_team_customer_and_an_existing_one_is_recovered() {
    let (db, pg) = TestDb::with_admin().await;
    let emu = Emulator::start(&[]).await;
    // Already at Polar (say, from an earlier attempt whose answer was lost).
    let r = http()
        .post(format!("{}/__admin/customers", emu.base))
        .json(&serde_json::json!({"external_id": "globex", "email": "ops@globex.example", "name": "Globex"}))
        .send()
        .await
        .unwrap();
    let existing: serde_json::Value = r.json().await.unwrap();
    let _side = Sidecar::start_with(&db, &emu.sidecar_env()).await;

    pg.execute("INSERT INTO meter.organization (id, name, email) VALUES ('acme', 'Acme', 'billing@acme.example')", &[]).await.unwrap();
    pg.execute("INSERT INTO meter.organization (id, name, email) VALUES ('globex', 'Globex', 'billing@globex.example')", &[]).await.unwrap();
    let acme = eventually(30, "acme provisioned", || async {
        customer_id(&pg, "acme").await
    })
    .await;
    let globex = eventually(30, "globex provisioned", || async {
        customer_id(&pg, "globex").await
    })
    .await;

    let customers = emu.customers().await;
    let of = |ext: &str| {
        customers
            .iter()
            .filter(|c| c["external_id"] == ext)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(of("acme").len(), 1, "created once");
    assert_eq!(of("acme")[0]["id"], acme.as_str());
    assert_eq!(of("acme")[0]["type"], "team");
    assert_eq!(
        of("globex").len(),
        1,
        "no duplicate for an existing customer"
    );
    assert_eq!(
        existing["id"],
        globex.as_str(),
        "the existing id was recovered"
    );
    let audited: i64 = pg
        .value("SELECT count(*) FROM meter.audit_log WHERE action = 'customer.provisioned'")
        .await;
    assert_eq!(audited, 2);
}

#[tokio::test]
async fn backfill_provisions_fifty_orgs() {
    let (db, pg) = TestDb::with_admin().await;
    let emu = Emulator::start(&[]).await;
    pg.execute(
        "INSERT INTO meter.organization (id, name, email) SELECT 'org' || i, 'Org ' || i, 'org' || i || '@example.org' FROM generate_series(1, 50) i",
        &[],
    )
    .await
    .unwrap();
    let out = meterd_cli(&db, &emu, &["backfill"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("50 organizations queued, 50 provisioned")
    );
    let missing: i64 = pg
        .value("SELECT count(*) FROM meter.organization WHERE polar_customer_id IS NULL")
        .await;
    assert_eq!(missing, 0);
    let customers = emu.customers().await;
    assert_eq!(customers.len(), 50);
    let linked: i64 = pg
        .value("SELECT count(DISTINCT polar_customer_id) FROM meter.organization")
        .await;
    assert_eq!(linked, 50);
}
