//! Exactly-once delivery to Polar, end to end: HTTP -> outbox -> sidecar ->
//! the Polar emulator over real HTTP; per-event failures against Polar-wide
//! ones; delivery waiting for the customer; fairness between organizations.
use pm_e2e::{
    assert_polar_holds_exactly, eventually, http, record_many, statuses, Emulator, Sidecar, TestDb,
    Webhook,
};
use pm_e2e::{Fetch, Value1};
use serde_json::{json, Value};
use tokio_postgres::Client;

async fn orgs(db: &TestDb, pg: &Client, names: &[&str]) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    for n in names {
        db.org(pg, n).await;
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

async fn max_attempts(pg: &Client) -> i32 {
    pg.query_one(
        "SELECT coalesce(max(attempts), 0) FROM meter.meter_event",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn ten_thousand_events_for_three_orgs_reach_polar_exactly_once() {
    let (db, pg) = TestDb::with_admin().await;
    let keys = orgs(&db, &pg, &["acme", "globex", "initech"]).await;
    let emu = Emulator::start(&[]).await;
    // Record first with delivery off, then let a delivering sidecar, woken
    // by the cron entry point, take them.
    let side = Sidecar::start(&db, &[]).await;
    let sent = record_many(&side, &keys, 10_000, 32).await;
    assert_eq!(statuses(&pg).await.get("pending"), Some(&10_000));
    drop(side);
    let _side = Sidecar::start_with(&db, &emu.sidecar_env()).await;
    let stats: Value = pg.value("SELECT meter.drain_meter_outbox()").await;
    assert_eq!(
        stats["backlog"]["pending"], 10_000,
        "the cron drain claims nothing: {stats}"
    );
    all_sent(&pg, 10_000, 120).await;
    assert_polar_holds_exactly(&emu, &sent).await;
    let s = statuses(&pg).await;
    assert_eq!(s.len(), 1, "nothing in_flight, failed or dropped: {s:?}");
    let dup = emu.events().await["duplicates"].as_u64().unwrap();
    assert_eq!(dup, 0, "no event was ever sent twice");
}

#[tokio::test]
async fn two_sidecars_at_once_never_send_an_event_twice() {
    let (db, pg) = TestDb::with_admin().await;
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
    let (db, pg) = TestDb::with_admin().await;
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
    pg.run("INSERT INTO meter.meter_event (organization_id, idempotency_key, event_name, event_timestamp, metadata, payload_hash, external_id)
         VALUES ('acme', 'poison', 'api.request', now() - interval '1 minute', '{\"nested\": {\"x\": 1}}', '\\x00', 'pm_poison')").await;
    let _side = Sidecar::start_with(&db, &env).await;
    all_sent(&pg, 300, 60).await;
    eventually(30, "the poisoned event rejected", || async {
        (statuses(&pg).await.get("rejected") == Some(&1)).then_some(())
    })
    .await;
    let err: String = pg
        .value("SELECT last_error FROM meter.meter_event WHERE idempotency_key = 'poison'")
        .await;
    assert!(err.contains("422") && err.contains("metadata"), "{err}");
    assert_polar_holds_exactly(&emu, &sent).await;
    let audited: i64 = pg
        .value("SELECT count(*) FROM meter.audit_log WHERE action IN ('alert.event_rejected', 'event.rejected')").await;
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
async fn an_ingest_failing_while_polar_is_healthy_counts_seven_attempts_then_drops_and_requeue_delivers(
) {
    let (db, pg) = TestDb::with_admin().await;
    // A short clock for the backoff: 50 ms doubling, capped at 200 ms.
    db.set(&pg, "backoff_base", "50 milliseconds").await;
    db.set(&pg, "backoff_cap", "200 milliseconds").await;
    let keys = orgs(&db, &pg, &["acme", "globex"]).await;
    let emu = Emulator::start(&[]).await;
    // Only ingest fails: Polar answers everything else, so these failures
    // are the events' own (a per-event cause), not Polar's.
    emu.faults(json!({"error_5xx": 1.0, "only": ["POST /v1/events/ingest"]}))
        .await;
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
        .column("SELECT DISTINCT attempts FROM meter.meter_event")
        .await;
    assert_eq!(attempts, vec![7]);
    assert!(emu.events().await["events"].as_array().unwrap().is_empty());
    let dropped_audit: i64 = pg
        .value("SELECT count(*) FROM meter.audit_log WHERE action = 'event.dropped'")
        .await;
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

    emu.faults(json!({})).await;
    let n: i64 = pg.value("SELECT meter.requeue_dropped()").await;
    assert_eq!(n, 200);
    all_sent(&pg, 200, 60).await;
    assert_polar_holds_exactly(&emu, &sent).await;
}

/// Waits until the emulator has answered `call` (e.g. "GET /v1/events/ 401")
/// at least `n` times: proof that the sidecar kept working meanwhile.
async fn answered(emu: &Emulator, call: &str, n: u64, secs: u64) {
    eventually(secs, &format!("{n} x {call}"), || async {
        (emu.stats().await["requests"][call].as_u64().unwrap_or(0) >= n).then_some(())
    })
    .await;
}

/// Waits for an alert of `kind` at the webhook; returns how many arrived.
async fn alert_at(hook: &Webhook, kind: &str, secs: u64) -> usize {
    eventually(secs, &format!("a {kind} alert at the webhook"), || async {
        let n = hook.kinds().iter().filter(|k| *k == kind).count();
        (n > 0).then_some(n)
    })
    .await
}

#[tokio::test]
async fn a_refused_token_pauses_delivery_without_consuming_attempts_then_resumes_exactly_once() {
    let (db, pg) = TestDb::with_admin().await;
    db.set(&pg, "backoff_base", "50 milliseconds").await;
    db.set(&pg, "backoff_cap", "200 milliseconds").await;
    let keys = orgs(&db, &pg, &["acme"]).await;
    let emu = Emulator::start(&[]).await;
    let hook = Webhook::start().await;
    let mut env = emu.sidecar_env();
    env.push(("ALERT_WEBHOOK_URL".into(), hook.url.clone()));
    let side = Sidecar::start_with(&db, &env).await;
    // The customer exists first; then the token stops working.
    eventually(30, "acme provisioned", || async {
        let c: Option<String> = pg
            .value("SELECT polar_customer_id FROM meter.organization WHERE id = 'acme'")
            .await;
        c.map(|_| ())
    })
    .await;
    emu.faults(json!({"reject_token": true})).await;
    let sent = record_many(&side, &keys, 300, 16).await;
    alert_at(&hook, "polar_unavailable", 60).await;
    let ready: Value = http().get(side.admin_url("/readyz")).fetch_json().await;
    assert_eq!(ready["delivery"]["paused"], true, "{ready}");
    assert!(
        ready["delivery"]["cause"].as_str().unwrap().contains("401"),
        "{ready}"
    );
    let metrics = http().get(side.admin_url("/metrics")).fetch_text().await;
    assert!(
        metrics.contains("polar_meter_delivery_paused 1"),
        "{metrics}"
    );
    // Several checks of the token later (a probe a second), long enough for
    // seven attempts at this backoff, had they been counted.
    answered(&emu, "GET /v1/events/ 401", 4, 60).await;
    assert_eq!(
        max_attempts(&pg).await,
        0,
        "a refused token is not the events' fault"
    );
    let s = statuses(&pg).await;
    assert!(
        !s.contains_key("dropped") && !s.contains_key("sent"),
        "{s:?}"
    );

    emu.faults(json!({})).await;
    all_sent(&pg, 300, 60).await;
    assert_polar_holds_exactly(&emu, &sent).await;
    assert_eq!(max_attempts(&pg).await, 0);
    assert_eq!(
        hook.kinds()
            .iter()
            .filter(|k| *k == "polar_unavailable")
            .count(),
        1,
        "one alert per hour, not one per try"
    );
}

#[tokio::test]
async fn polar_failing_everywhere_pauses_and_drops_nothing() {
    let (db, pg) = TestDb::with_admin().await;
    db.set(&pg, "backoff_base", "50 milliseconds").await;
    db.set(&pg, "backoff_cap", "200 milliseconds").await;
    let keys = orgs(&db, &pg, &["acme", "globex"]).await;
    let emu = Emulator::start(&[]).await;
    let hook = Webhook::start().await;
    let mut env = emu.sidecar_env();
    env.push(("ALERT_WEBHOOK_URL".into(), hook.url.clone()));
    env.push(("POLAR_BATCH_SIZE".into(), "20".into()));
    let side = Sidecar::start_with(&db, &env).await;
    eventually(30, "both provisioned", || async {
        let n: i64 = pg
            .value("SELECT count(*) FROM meter.organization WHERE polar_customer_id IS NOT NULL")
            .await;
        (n == 2).then_some(())
    })
    .await;
    emu.faults(json!({"error_5xx": 1.0, "error_status": 503}))
        .await;
    let sent = record_many(&side, &keys, 200, 16).await;
    alert_at(&hook, "polar_unavailable", 60).await;
    // At this backoff, seven attempts take about a second; the outage lasts
    // several probes (a second apart) longer.
    answered(&emu, "GET /v1/events/ 503", 4, 60).await;
    assert!(
        max_attempts(&pg).await <= 2,
        "only the calls before the breaker decided count"
    );
    assert!(!statuses(&pg).await.contains_key("dropped"));
    emu.faults(json!({})).await;
    all_sent(&pg, 200, 60).await;
    assert_polar_holds_exactly(&emu, &sent).await;
}

#[tokio::test]
async fn events_wait_for_their_customer_without_attempts_then_go() {
    let (db, pg) = TestDb::with_admin().await;
    // An organization Polar would refuse as a customer (no email, no owner),
    // put in behind upsert_organization's back, and one that is fine.
    pg.run("INSERT INTO meter.organization (id, name) VALUES ('acme', 'Acme')")
        .await;
    let (_, key) = db.key(&pg, "acme", &["fence:meter"]).await;
    let ready = orgs(&db, &pg, &["ready"]).await;
    let emu = Emulator::start(&[]).await;
    let side = Sidecar::start_with(&db, &emu.sidecar_env()).await;
    let waiting = record_many(&side, &[("acme".to_string(), key)], 50, 8).await;
    let mut sent = record_many(&side, &ready, 10, 4).await;
    // The other organization's events went: the drain ran, and passed acme by.
    all_sent(&pg, 10, 60).await;
    assert_eq!(
        statuses(&pg).await.get("pending"),
        Some(&50),
        "nothing goes before the customer exists"
    );
    assert_eq!(max_attempts(&pg).await, 0);
    assert_eq!(
        emu.customers().await.len(),
        1,
        "no customer Polar would refuse is attempted"
    );
    let stats: Value = pg.value("SELECT meter.outbox_stats()").await;
    assert_eq!(stats["waiting_for_customer"], 50);
    // The fix: an email. The customer is created, then the events go.
    pg.execute(
        "SELECT meter.upsert_organization('acme', 'Acme', 'billing@acme.example')",
        &[],
    )
    .await
    .unwrap();
    all_sent(&pg, 60, 60).await;
    sent.extend(waiting);
    assert_polar_holds_exactly(&emu, &sent).await;
    let customers = emu.customers().await;
    assert_eq!(customers.len(), 2);
    assert!(customers
        .iter()
        .any(|c| c["external_id"] == "acme" && c["email"] == "billing@acme.example"));
}

#[tokio::test]
async fn a_backlog_of_one_organization_holds_back_another_by_at_most_a_round() {
    let (db, pg) = TestDb::with_admin().await;
    let keys = orgs(&db, &pg, &["big", "small"]).await;
    // 20k events of "big" are due before anything of "small" exists.
    pg.execute(
        "SELECT count(*) FROM generate_series(0, 19) b,
             LATERAL meter.record_events_for_org('big', (SELECT jsonb_agg(jsonb_build_object(
                 'idempotency_key', 'b' || i, 'event_name', 'api.request', 'event_timestamp', now() - interval '1 minute'))
                 FROM generate_series(b * 1000 + 1, b * 1000 + 1000) i)) r",
        &[],
    )
    .await
    .unwrap();
    let emu = Emulator::start(&[]).await;
    let mut env = emu.sidecar_env();
    // Two calls a second, 500 events a call: "big" alone needs about 20 s.
    env.push(("POLAR_RATE_LIMIT".into(), "120".into()));
    env.push(("POLAR_BATCH_SIZE".into(), "500".into()));
    let side = Sidecar::start_with(&db, &env).await;
    let big_sent = || async {
        pg.query_one("SELECT count(*) FROM meter.meter_event WHERE organization_id = 'big' AND polar_status = 'sent'", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    eventually(60, "big's delivery under way", || async {
        (big_sent().await >= 500).then_some(())
    })
    .await;
    let before = big_sent().await;
    record_many(&side, &keys[1..], 1, 1).await;
    eventually(60, "small's fresh event sent", || async {
        let n: i64 = pg
            .value("SELECT count(*) FROM meter.meter_event WHERE organization_id = 'small' AND polar_status = 'sent'").await;
        (n == 1).then_some(())
    })
    .await;
    let after = big_sent().await;
    assert!(after < 20_000, "small did not wait for big's whole backlog");
    assert!(
        after - before <= 2 * 500,
        "at most the round in progress and one more went first: {} of big's events",
        after - before
    );
}

#[tokio::test]
async fn polar_finding_our_events_in_its_future_is_clock_skew_not_a_rejection() {
    let (db, pg) = TestDb::with_admin().await;
    let keys = orgs(&db, &pg, &["acme"]).await;
    let emu = Emulator::start(&[]).await;
    // Polar's clock runs 8 s behind ours: our fresh events are in its future.
    emu.faults(json!({"clock_offset_ms": -8000})).await;
    let side = Sidecar::start_with(&db, &emu.sidecar_env()).await;
    let sent = record_many(&side, &keys, 20, 4).await;
    all_sent(&pg, 20, 60).await;
    assert_polar_holds_exactly(&emu, &sent).await;
    assert!(!statuses(&pg).await.contains_key("rejected"));
    assert_eq!(max_attempts(&pg).await, 0, "retried shortly, not counted");
    let refused = emu.stats().await["requests"]["POST /v1/events/ingest 422"]
        .as_u64()
        .unwrap_or(0);
    assert!(refused > 0, "Polar did refuse them first");
}

#[tokio::test]
async fn three_sidecars_share_one_rate_budget() {
    let (db, pg) = TestDb::with_admin().await;
    orgs(&db, &pg, &["acme"]).await;
    pg.execute(
        "SELECT count(*) FROM generate_series(0, 2) b,
             LATERAL meter.record_events_for_org('acme', (SELECT jsonb_agg(jsonb_build_object(
                 'idempotency_key', 'k' || i, 'event_name', 'api.request', 'event_timestamp', now() - interval '1 minute'))
                 FROM generate_series(b * 1000 + 1, b * 1000 + 1000) i)) r",
        &[],
    )
    .await
    .unwrap();
    // Polar allows 100 calls a minute; each sidecar is told 90 for the fleet.
    // Three limiters of their own would make 270 and be throttled.
    let emu = Emulator::start(&["--rate-limit", "100"]).await;
    let mut env = emu.sidecar_env();
    env.push(("POLAR_RATE_LIMIT".into(), "90".into()));
    env.push(("POLAR_BATCH_SIZE".into(), "100".into()));
    let _a = Sidecar::start_with(&db, &env).await;
    let _b = Sidecar::start_with(&db, &env).await;
    let _c = Sidecar::start_with(&db, &env).await;
    all_sent(&pg, 3_000, 120).await;
    let stats = emu.stats().await;
    let throttled: u64 = stats["requests"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.ends_with(" 429"))
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();
    assert_eq!(throttled, 0, "no 429 caused by our own traffic: {stats}");
    assert_eq!(
        emu.events().await["events"].as_array().unwrap().len(),
        3_000
    );
}
