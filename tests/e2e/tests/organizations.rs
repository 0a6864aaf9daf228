//! Organizations through meter.upsert_organization: Polar's rule for a team
//! customer applied before a row exists, an owner instead of an email, and
//! a changed name or email pushed to the Polar customer.
use pm_e2e::Value1;
use pm_e2e::{customer_id, eventually, sqlstate, Emulator, Sidecar, TestDb};

#[tokio::test]
async fn polars_rule_for_a_team_customer_is_applied_before_a_row_exists() {
    let (db, pg) = TestDb::with_admin().await;
    for (args, needle) in [
        ("'acme', 'Acme'", "owner"),
        ("'acme', 'Acme', 'not-an-address'", "email"),
        ("'acme', 'Acme', NULL, NULL, 'Jo'", "owner_email"),
        ("'acme', 'Acme', NULL, 'jo@'", "owner_email"),
        ("'', 'Acme', 'a@b.co'", "id"),
        ("'acme', '   ', 'a@b.co'", "name"),
        ("'acme', NULL, 'a@b.co'", "name"),
        ("'acme', repeat('n', 257), 'a@b.co'", "name"),
    ] {
        let r = pg
            .query_one(
                &format!("SELECT * FROM meter.upsert_organization({args})"),
                &[],
            )
            .await;
        let (code, msg) = pm_e2e::db_error(r);
        assert_eq!(code, "PM036", "{args}");
        assert!(msg.contains(needle), "{args}: {msg}");
    }
    let n: i64 = pg.value("SELECT count(*) FROM meter.organization").await;
    assert_eq!(n, 0);
    // A DBA who is not a superuser manages organizations through the function.
    let dba = format!("dba_{}", uuid::Uuid::new_v4().simple());
    pg.run(&format!(
        "CREATE ROLE {dba} LOGIN IN ROLE polar_meter_admin"
    ))
    .await;
    let dba = db.client_as(&dba).await;
    let row = dba
        .query_one("SELECT id, email, owner_email FROM meter.upsert_organization('acme', 'Acme', NULL, 'ceo@acme.example', 'Ada')", &[])
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("ceo@acme.example")
    );
    assert_eq!(
        sqlstate(
            dba.execute(
                "INSERT INTO meter.organization (id, name) VALUES ('x', 'x')",
                &[]
            )
            .await
        ),
        "42501"
    );
    // The sidecar's role cannot.
    let side = format!("side_{}", uuid::Uuid::new_v4().simple());
    pg.run(&format!(
        "CREATE ROLE {side} LOGIN IN ROLE polar_meter_sidecar"
    ))
    .await;
    let side = db.client_as(&side).await;
    assert_eq!(
        sqlstate(
            side.query_one(
                "SELECT * FROM meter.upsert_organization('evil', 'Evil', 'e@evil.example')",
                &[]
            )
            .await
        ),
        "42501"
    );
    let audited: i64 = pg
        .value("SELECT count(*) FROM meter.audit_log WHERE action = 'organization.created' AND organization_id = 'acme'").await;
    assert_eq!(audited, 1);
}

#[tokio::test]
async fn an_owner_stands_in_for_the_email_and_a_change_reaches_polar() {
    let (db, pg) = TestDb::with_admin().await;
    let emu = Emulator::start(&[]).await;
    let _side = Sidecar::start_with(&db, &emu.sidecar_env()).await;
    pg.execute(
        "SELECT meter.upsert_organization('acme', 'Acme', NULL, 'ceo@acme.example', 'Ada Lovelace', 'user_1')",
        &[],
    )
    .await
    .unwrap();
    let id = eventually(30, "acme provisioned", || async {
        customer_id(&pg, "acme").await
    })
    .await;
    let c = &emu.customers().await[0];
    assert_eq!(c["id"], id.as_str());
    assert_eq!(c["type"], "team");
    assert!(c["email"].is_null(), "an owner, not an email: {c}");

    // A new name and an email: pushed to the same customer, not a new one.
    pg.execute("SELECT meter.upsert_organization('acme', 'Acme Corp', 'billing@acme.example', 'ceo@acme.example')", &[])
        .await
        .unwrap();
    eventually(30, "Polar holds the new name and email", || async {
        let cs = emu.customers().await;
        (cs.len() == 1 && cs[0]["name"] == "Acme Corp" && cs[0]["email"] == "billing@acme.example")
            .then_some(())
    })
    .await;
    eventually(30, "the change marked as synced", || async {
        let r = pg
            .query_one("SELECT customer_version, customer_synced FROM meter.organization WHERE id = 'acme'", &[])
            .await
            .unwrap();
        (r.get::<_, i32>(0) == 1 && r.get::<_, i32>(1) == 1).then_some(())
    })
    .await;
    assert_eq!(customer_id(&pg, "acme").await, Some(id));
    let patched = emu.stats().await["requests"]
        .as_object()
        .unwrap()
        .keys()
        .any(|k| k.starts_with("PATCH /v1/customers/"));
    assert!(patched, "through PATCH /v1/customers/{{id}}");
    // Owner-only changes are kept here and not pushed (Polar's owner is a member it made once).
    pg.execute("SELECT meter.upsert_organization('acme', 'Acme Corp', 'billing@acme.example', 'cto@acme.example')", &[])
        .await
        .unwrap();
    let v: i32 = pg
        .value("SELECT customer_version FROM meter.organization WHERE id = 'acme'")
        .await;
    assert_eq!(v, 1);
}
