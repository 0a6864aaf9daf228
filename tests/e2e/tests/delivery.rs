//! Exactly-once delivery to Polar, end to end: HTTP -> outbox -> sidecar ->
//! the Polar emulator over real HTTP.
use pm_e2e::{
    assert_polar_holds_exactly, eventually, record_many, statuses, Emulator, Sidecar, TestDb,
    Webhook,
};
use tokio_postgres::Client;

async fn orgs(db: &TestDb, pg: &Client, names: &[&str]) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    for n in names {
        pg.execute("INSERT INTO meter.organization (id, name, email) VALUES ($1, $1, $1 || '@example.org')", &[n]).await.unwrap();
        keys.push((n.to_string(), db.key(pg, n, &["fence:meter"]).await.1));
    }
    keys
}

async fn all_sent(pg: &Client, n: i64, secs: u64) {
    eventually(secs, "every event sent", || async {
        let s = statuses(pg).await;
        (s.get("sent").copied().unwrap_or(0) == n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn ten_thousand_events_for_three_orgs_reach_polar_exactly_once() {
    let db = TestDb::new().await;
    let pg = db.admin().await;
    let keys = orgs(&db, &pg, &["acme", "globex", "initech"]).await;
    let emu = Emulator::start(&[]).await;
    // Record first with delivery off, then let the cron entry point claim.
    let side = Sidecar::start(&db, &[]).await;
    let sent = record_many(&side, &keys, 10_000, 32).await;
    assert_eq!(statuses(&pg).await.get("pending"), Some(&10_000));
    drop(side);
    let _side = Sidecar::start_with(&db, &emu.sidecar_env()).await;
    pg.query("SELECT * FROM meter.drain_meter_outbox()", &[])
        .await
        .unwrap();
    all_sent(&pg, 10_000, 120).await;
    assert_polar_holds_exactly(&emu, &sent).await;
    let s = statuses(&pg).await;
    assert_eq!(s.len(), 1, "nothing in_flight, failed or dropped: {s:?}");
    let dup = emu.events().await["duplicates"].as_u64().unwrap();
    assert_eq!(dup, 0, "no event was ever sent twice");
}

#[tokio::test]
async fn two_sidecars_at_once_never_send_an_event_twice() {
    let db = TestDb::new().await;
    let pg = db.admin().await;
    let keys = orgs(&db, &pg, &["acme", "globex"]).await;
    let emu = Emulator::start(&[]).await;
    let mut env = emu.sidecar_env();
    env.push(("POLAR_BATCH_SIZE".into(), "100".into()));
    let a = Sidecar::start_with(&db, &env).await;
    let _b = Sidecar::start_with(&db, &env).await;
    // Both record and both drain, concurrently.
    let sent = record_many(&a, &keys, 4_000, 32).await;
    all_sent(&pg, 4_000, 120).await;
    assert_polar_holds_exactly(&emu, &sent).await;
    let v = emu.events().await;
    assert_eq!(v["duplicates"].as_u64(), Some(0), "no row was sent by both");
}

#[tokio::test]
async fn a_poisoned_event_is_rejected_with_an_alert_and_the_rest_delivered() {
    let db = TestDb::new().await;
    let pg = db.admin().await;
    let keys = orgs(&db, &pg, &["acme"]).await;
    let emu = Emulator::start(&[]).await;
    let hook = Webhook::start().await;
    let mut env = emu.sidecar_env();
    env.push(("ALERT_WEBHOOK_URL".into(), hook.url.clone()));
    let side = Sidecar::start(&db, &[]).await;
    let sent = record_many(&side, &keys, 300, 16).await;
    drop(side);
    // A row Polar refuses, put in behind the extension's back (as a bug or a
    // manual insert might): nested metadata.
    pg.batch_execute(
        "INSERT INTO meter.meter_event (organization_id, idempotency_key, event_name, event_timestamp, metadata, payload_hash, external_id)
         VALUES ('acme', 'poison', 'api.request', now() - interval '1 minute', '{\"nested\": {\"x\": 1}}', '\\x00', 'pm_poison')",
    )
    .await
    .unwrap();
    let _side = Sidecar::start_with(&db, &env).await;
    all_sent(&pg, 300, 60).await;
    eventually(30, "the poisoned event rejected", || async {
        (statuses(&pg).await.get("rejected") == Some(&1)).then_some(())
    })
    .await;
    let err: String = pg
        .query_one(
            "SELECT last_error FROM meter.meter_event WHERE idempotency_key = 'poison'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(err.contains("422") && err.contains("metadata"), "{err}");
    assert_polar_holds_exactly(&emu, &sent).await;
    let audited: i64 = pg
        .query_one("SELECT count(*) FROM meter.audit_log WHERE action IN ('alert.event_rejected', 'event.rejected')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        audited, 2,
        "an audit row for the event and one for the alert"
    );
    eventually(30, "the webhook to receive event_rejected", || async {
        hook.kinds()
            .contains(&"event_rejected".to_string())
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn polar_down_past_seven_attempts_drops_alerts_and_requeue_delivers() {
    let db = TestDb::new().await;
    let pg = db.admin().await;
    // A short clock for the backoff: 50 ms doubling, capped at 200 ms.
    pg.batch_execute(&format!(
        "ALTER DATABASE {0} SET polar_meter.backoff_base = '50 milliseconds'; ALTER DATABASE {0} SET polar_meter.backoff_cap = '200 milliseconds'",
        db.name
    ))
    .await
    .unwrap();
    let keys = orgs(&db, &pg, &["acme", "globex"]).await;
    let emu = Emulator::start(&[]).await;
    emu.faults(serde_json::json!({"error_5xx": 1.0})).await;
    let hook = Webhook::start().await;
    let mut env = emu.sidecar_env();
    env.push(("ALERT_WEBHOOK_URL".into(), hook.url.clone()));
    let side = Sidecar::start_with(&db, &env).await;
    let sent = record_many(&side, &keys, 200, 16).await;
    eventually(120, "every event dropped after 7 attempts", || async {
        (statuses(&pg).await.get("dropped") == Some(&200)).then_some(())
    })
    .await;
    let attempts: Vec<i32> = pg
        .query("SELECT DISTINCT attempts FROM meter.meter_event", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(attempts, vec![7]);
    assert!(emu.events().await["events"].as_array().unwrap().is_empty());
    let dropped_audit: i64 = pg
        .query_one(
            "SELECT count(*) FROM meter.audit_log WHERE action = 'event.dropped'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dropped_audit, 200);
    eventually(30, "the webhook to receive event_dropped", || async {
        hook.kinds()
            .contains(&"event_dropped".to_string())
            .then_some(())
    })
    .await;
    assert!(
        side.logs_text().contains("\"message\":\"alert\""),
        "a structured warning is logged"
    );

    emu.faults(serde_json::json!({})).await;
    let n: i64 = pg
        .query_one("SELECT meter.requeue_dropped()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200);
    all_sent(&pg, 200, 60).await;
    assert_polar_holds_exactly(&emu, &sent).await;
}
