//! The sidecar's role can execute what it serves and nothing else.
use pm_e2e::Value1;
use pm_e2e::{sqlstate, TestDb};

#[tokio::test]
async fn the_sidecar_role_executes_functions_but_touches_no_table() {
    let (db, dba) = TestDb::with_admin().await;
    db.org(&dba, "acme").await;
    let (_, key) = db.key(&dba, "acme", &["fence:meter"]).await;
    // Roles are cluster-wide; a unique login role per test keeps tests independent.
    let login = format!("meterd_{}", &db.name[2..]);
    dba.run(&format!(
        "CREATE ROLE {login} LOGIN IN ROLE polar_meter_sidecar"
    ))
    .await;
    let side = db.client_as(&login).await;

    // What it may do.
    let r = side
        .query_one(
            "SELECT status FROM meter.record_events($1, jsonb_build_array(jsonb_build_object(
                 'idempotency_key', 'p-1', 'event_name', 'api.request', 'event_timestamp', now())))",
            &[&key],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "recorded");
    side.query_one(
        "SELECT organization_id FROM meter.verify_api_key($1, 'fence:meter')",
        &[&key],
    )
    .await
    .unwrap();
    side.query("SELECT * FROM meter.due_organizations()", &[])
        .await
        .unwrap();
    side.query("SELECT * FROM meter.claim_delivery('acme')", &[])
        .await
        .unwrap();

    assert_eq!(
        sqlstate(
            side.query(
                "SELECT * FROM meter.record_event($1, 'p-2', 'api.request', now(), '{}')",
                &[&key]
            )
            .await
        ),
        "42501",
        "what the sidecar never calls it is not granted"
    );

    // What it may not: read any table (key hashes included), write any table,
    // or call management functions.
    for sql in [
        "SELECT key_hash FROM meter.api_key",
        "SELECT * FROM meter.meter_event",
        "SELECT * FROM meter.audit_log",
        "SELECT * FROM meter.organization",
        "INSERT INTO meter.organization (id, name) VALUES ('evil', 'evil')",
        "INSERT INTO meter.meter_event (organization_id, idempotency_key, event_name, event_timestamp, payload_hash, external_id)
         VALUES ('acme', 'x', 'e', now(), '\\x00', 'x')",
        "UPDATE meter.meter_event SET polar_status = 'sent'",
        "UPDATE meter.api_key SET revoked_at = NULL",
        "SELECT * FROM meter.create_api_key('acme', 'evil')",
        "SELECT * FROM meter.list_api_keys('acme')",
        "SELECT meter.revoke_api_key(gen_random_uuid())",
        "SELECT * FROM meter.rotate_api_key(gen_random_uuid())",
        "SELECT * FROM meter.record_event_for_org('acme', 'x', 'e', now())",
        "SELECT meter.set_schedule('drain', '* * * * *')",
        "SELECT meter.set_setting('max_future_skew', '1 hour')",
        "SELECT meter.drain_meter_outbox()",
        "SELECT meter.requeue_dropped()",
        "SELECT meter.upsert_organization('evil', 'Evil', 'evil@example.org')",
        "SELECT meter._audit('acme', 'forged', NULL, '{}')",
        "SELECT meter._alert('drift', 'acme', '{}')",
        "SELECT nextval('meter.audit_log_id_seq')",
    ] {
        assert_eq!(sqlstate(side.query(sql, &[]).await), "42501", "{sql}");
    }
    // PUBLIC has nothing either.
    let nobody = format!("nobody_{}", &db.name[2..]);
    dba.run(&format!("CREATE ROLE {nobody} LOGIN")).await;
    let pubc = db.client_as(&nobody).await;
    assert_eq!(
        sqlstate(
            pubc.query(
                "SELECT * FROM meter.record_event($1, 'x', 'e', now(), '{}')",
                &[&key]
            )
            .await
        ),
        "42501"
    );
}
