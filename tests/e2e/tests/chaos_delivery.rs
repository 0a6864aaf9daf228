//! Delivery under faults: Polar failing, throttling and dropping connections
//! after committing, and the sidecar killed (SIGKILL) twice mid-drain. Polar
//! must still hold every event exactly once, with nothing left in flight and
//! nothing dropped.
use pm_e2e::Value1;
use pm_e2e::{
    assert_polar_holds_exactly, eventually, record_many, statuses, Emulator, Sidecar, TestDb,
};

#[tokio::test]
async fn faults_and_kills_still_deliver_each_event_exactly_once() {
    let (db, pg) = TestDb::with_admin().await;
    db.set(&pg, "backoff_base", "100 milliseconds").await;
    db.set(&pg, "backoff_cap", "1 second").await;
    let mut keys = Vec::new();
    for org in ["acme", "globex", "initech"] {
        db.org(&pg, org).await;
        keys.push((org.to_string(), db.key(&pg, org, &["fence:meter"]).await.1));
    }
    let recorder = Sidecar::start(&db, &[]).await;
    let sent = record_many(&recorder, &keys, 10_000, 32).await;
    drop(recorder);

    let emu = Emulator::start(&[]).await;
    emu.faults(serde_json::json!({"error_5xx": 0.2, "rate_429": 0.1, "commit_then_drop": 0.05}))
        .await;
    let mut env = emu.sidecar_env();
    // Small batches make ~200 sends of 10k events, so a 5% drop rate is all
    // but certain to fire (0.95^200 < 1e-4) while the run stays short.
    for (k, v) in [
        ("POLAR_BATCH_SIZE", "50"),
        ("POLAR_RATE_LIMIT", "480"),
        ("POLAR_TIMEOUT_SECS", "2"),
        ("POLAR_METER_LEASE_SECS", "12"),
    ] {
        env.retain(|(ek, _)| ek != k);
        env.push((k.into(), v.into()));
    }
    let sent_count = || async { statuses(&pg).await.get("sent").copied().unwrap_or(0) };

    let first = Sidecar::start_with(&db, &env).await;
    eventually(120, "a first part delivered", || async {
        (sent_count().await >= 1_500).then_some(())
    })
    .await;
    first.kill().await;
    let second = Sidecar::start_with(&db, &env).await;
    eventually(120, "more delivered", || async {
        (sent_count().await >= 5_000).then_some(())
    })
    .await;
    second.kill().await;
    let _third = Sidecar::start_with(&db, &env).await;
    eventually(240, "everything delivered", || async {
        // One in five sends fails, so now and then a batch spends all seven
        // attempts and its events are dropped, as designed. The operator's
        // answer is requeue_dropped; exactly once must hold through it.
        pg.run("SELECT meter.requeue_dropped()").await;
        (sent_count().await == 10_000).then_some(())
    })
    .await;

    let s = statuses(&pg).await;
    assert_eq!(s.get("sent"), Some(&10_000));
    assert_eq!(
        s.len(),
        1,
        "nothing in_flight, failed, dropped or rejected: {s:?}"
    );
    assert_polar_holds_exactly(&emu, &sent).await;

    // The faults really happened, and resends were absorbed as duplicates.
    let stats = emu.stats().await;
    let count = |status: &str| {
        stats["requests"][format!("POST /v1/events/ingest {status}")]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(count("500") + count("502") > 0, "5xx injected: {stats}");
    assert!(count("429") > 0, "429 injected: {stats}");
    let retried: i64 = pg
        .value("SELECT count(*) FROM meter.meter_event WHERE attempts > 0")
        .await;
    assert!(retried > 0, "some events needed more than one attempt");
    // Every event whose acknowledgement was dropped came back and was
    // absorbed as a duplicate (kills may add more resends, never fewer).
    assert!(count("dropped") > 0, "commit-then-drop injected: {stats}");
    let unacknowledged = stats["unacknowledged_inserts"].as_u64().unwrap();
    assert!(unacknowledged > 0, "{stats}");
    let duplicates = emu.events().await["duplicates"].as_u64().unwrap();
    assert!(
        duplicates >= unacknowledged,
        "{duplicates} duplicates < {unacknowledged} unacknowledged inserts"
    );
}
