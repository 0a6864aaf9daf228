//! Reconciliation: Polar's event list against what we recorded, per window.
use pm_e2e::Value1;
use pm_e2e::{
    eventually, http, meterd_cli, reconcile_done, record_many, statuses, Emulator, Sidecar, TestDb,
};
use serde_json::Value;
use std::collections::BTreeSet;
use tokio_postgres::Client;

struct Day {
    db: TestDb,
    pg: Client,
    emu: Emulator,
    side: Option<Sidecar>,
}

/// 2 orgs, `n` events each, all delivered to the emulator.
async fn delivered_day(n: usize) -> Day {
    let (db, pg) = TestDb::with_admin().await;
    let mut keys = Vec::new();
    for org in ["acme", "globex"] {
        pg.execute("INSERT INTO meter.organization (id, name, email) VALUES ($1, $1, $1 || '@example.org')", &[&org]).await.unwrap();
        keys.push((org.to_string(), db.key(&pg, org, &["fence:meter"]).await.1));
    }
    let emu = Emulator::start(&[]).await;
    let side = Sidecar::start_with(&db, &emu.sidecar_env()).await;
    record_many(&side, &keys, 2 * n, 32).await;
    eventually(120, "all delivered", || async {
        (statuses(&pg).await.get("sent").copied() == Some(2 * n as i64)).then_some(())
    })
    .await;
    Day {
        db,
        pg,
        emu,
        side: Some(side),
    }
}

/// Opens a run over the last hour (`mode` None: the default choice) and waits for its end.
async fn reconcile(d: &Day, mode: Option<&str>) -> (i64, Value) {
    let id: i64 =
        d.pg.query_one(
            "SELECT meter.reconcile_meter_to_polar(now() + interval '1 minute', '1 hour', $1)",
            &[&mode],
        )
        .await
        .unwrap()
        .get(0);
    let result = run_done(&d.pg, id).await;
    (id, result)
}

/// Waits for run `id` to be done and returns its result.
async fn run_done(pg: &Client, id: i64) -> Value {
    reconcile_done(pg, id, 60).await
}

async fn audit_count(pg: &Client, action: &str) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM meter.audit_log WHERE action = $1",
        &[&action],
    )
    .await
    .unwrap()
    .get(0)
}

/// Deletes `k` of acme's events inside the emulator; returns their meter_event ids.
async fn delete_acme_events(emu: &Emulator, k: usize) -> BTreeSet<String> {
    let all = emu.events().await;
    let victims: Vec<&Value> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["external_customer_id"] == "acme")
        .take(k)
        .collect();
    let mut ids = BTreeSet::new();
    for v in victims {
        let r = http()
            .delete(format!(
                "{}/__admin/events/{}",
                emu.base,
                v["id"].as_str().unwrap()
            ))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        ids.insert(
            v["metadata"]["meter_event_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    ids
}

#[tokio::test]
async fn a_clean_day_has_no_drift_and_no_alert() {
    let d = delivered_day(2_500).await;
    let (_, r) = reconcile(&d, None).await;
    assert_eq!(r["local_sent"], 5_000);
    assert_eq!(r["remote_total"], 5_000);
    assert_eq!(r["drift"], 0);
    assert_eq!(r["missing_at_polar"]["count"], 0);
    assert_eq!(r["unexpected_at_polar"]["count"], 0);
    assert_eq!(audit_count(&d.pg, "alert.drift").await, 0);
    assert_eq!(audit_count(&d.pg, "reconcile.clean").await, 1);
    let unmatched: i64 =
        d.pg.value("SELECT count(*) FROM meter.meter_event WHERE polar_event_id IS NULL")
            .await;
    assert_eq!(unmatched, 0, "every matched event learned its Polar id");
}

#[tokio::test]
async fn two_percent_missing_for_one_org_is_reported_exactly_and_alerts() {
    let d = delivered_day(2_500).await;
    let deleted = delete_acme_events(&d.emu, 50).await;
    let (id, r) = reconcile(&d, None).await;
    assert_eq!(r["drift"], 50);
    assert_eq!(r["missing_at_polar"]["count"], 50);
    let missing: BTreeSet<String> = r["missing_at_polar"]["event_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(missing, deleted, "exactly the deleted events");
    let customers: Vec<&str> = r["customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["customer"].as_str().unwrap())
        .collect();
    assert_eq!(customers, ["acme"], "drift for exactly that org");
    assert_eq!(r["customers"][0]["delta"], -50);
    assert!((r["max_customer_drift_ratio"].as_f64().unwrap() - 0.02).abs() < 1e-9);
    assert_eq!(audit_count(&d.pg, "reconcile.drift").await, 1);
    assert_eq!(audit_count(&d.pg, "alert.drift").await, 1);
    let run: (i64, f64) = {
        let row =
            d.pg.query_one(
                "SELECT drift, drift_ratio FROM meter.reconcile_run WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(run.0, 50);
    assert!(d
        .side
        .as_ref()
        .unwrap()
        .logs_text()
        .contains("reconciliation found drift"));
}

#[tokio::test]
async fn half_a_percent_warns_and_audits_without_an_alert() {
    let d = delivered_day(2_500).await;
    delete_acme_events(&d.emu, 12).await;
    let (_, r) = reconcile(&d, None).await;
    assert_eq!(r["drift"], 12);
    assert_eq!(audit_count(&d.pg, "reconcile.drift").await, 1);
    assert_eq!(
        audit_count(&d.pg, "alert.drift").await,
        0,
        "0.48% is under the 1% threshold"
    );
}

#[tokio::test]
async fn events_at_polar_we_never_sent_are_unexpected_and_a_backlog_is_not_drift() {
    let mut d = delivered_day(500).await;
    // Someone else sends usage under our org's id.
    let ts = (chrono::Utc::now() - chrono::Duration::seconds(10)).to_rfc3339();
    let r = http()
        .post(format!("{}/v1/events/ingest", d.emu.base))
        .bearer_auth(&d.emu.token)
        .json(&serde_json::json!({"events": [
            {"name": "api.request", "external_customer_id": "acme", "timestamp": ts},
            {"name": "api.request", "external_customer_id": "acme", "timestamp": ts},
            {"name": "api.request", "external_customer_id": "acme", "timestamp": ts, "metadata": {"meter_event_id": "not-ours"}},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Delivery stops; 200 more events are recorded and stay pending.
    d.side.take().unwrap().kill().await;
    d.pg.execute("SELECT meter.record_event_for_org('globex', 'late-' || i, 'api.request', now() - interval '2 seconds') FROM generate_series(1, 200) i", &[])
        .await
        .unwrap();

    // The manual path: polar-meterd reconcile, logged in as the sidecar role.
    let end = (chrono::Utc::now() + chrono::Duration::minutes(1)).to_rfc3339();
    let out = meterd_cli(
        &d.db,
        &d.emu,
        &["reconcile", "--window-end", &end, "--window-hours", "1"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("the result as JSON");
    let r = &printed["result"];
    assert_eq!(r["unexpected_at_polar"]["count"], 3);
    assert_eq!(r["missing_at_polar"]["count"], 0);
    assert_eq!(r["backlog"]["pending"], 200, "{r}");
    assert_eq!(r["local_sent"], 1_000);
    assert_eq!(
        r["customers"].as_array().unwrap().len(),
        1,
        "only acme differs (by the 3 extra): {r}"
    );
    assert_eq!(r["customers"][0]["delta"], 3);
}

async fn list_calls(emu: &Emulator) -> u64 {
    emu.stats().await["requests"]["GET /v1/events/ 200"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_clean_day_in_counts_mode_costs_one_request_per_pair_and_lists_nothing() {
    let d = delivered_day(1_000).await;
    let before = list_calls(&d.emu).await;
    let (_, r) = reconcile(&d, Some("counts")).await;
    // 2 organizations x 2 event names, and the window's total.
    assert_eq!(list_calls(&d.emu).await - before, 5, "{r}");
    assert_eq!(
        (
            r["mode"].as_str(),
            r["drift"].as_i64(),
            r["pairs_listed"].as_i64()
        ),
        (Some("counts"), Some(0), Some(0))
    );
    assert_eq!(r["local_sent"], 2_000);
    assert_eq!(r["remote_total"], 2_000);
    assert_eq!(audit_count(&d.pg, "reconcile.clean").await, 1);
    let copies: i64 =
        d.pg.value("SELECT count(*) FROM meter.reconcile_remote")
            .await;
    assert_eq!(copies, 0, "nothing copied, nothing left");
}

#[tokio::test]
async fn counts_that_differ_list_only_that_pair_and_name_every_missing_event() {
    let d = delivered_day(1_000).await;
    let deleted = delete_acme_events(&d.emu, 7).await;
    let (_, r) = reconcile(&d, Some("counts")).await;
    assert!(
        r["pairs_listed"].as_i64().unwrap() >= 1 && r["pairs_listed"].as_i64().unwrap() <= 2,
        "acme's pairs only: {r}"
    );
    assert_eq!(r["missing_at_polar"]["count"], 7);
    let missing: BTreeSet<String> = r["missing_at_polar"]["event_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(missing, deleted);
    assert_eq!(r["drift"], 7);
    let copies: i64 =
        d.pg.value("SELECT count(*) FROM meter.reconcile_remote")
            .await;
    assert_eq!(
        copies, 0,
        "the copy of Polar's events is pruned once the run is done"
    );
}

#[tokio::test]
async fn events_under_a_pair_we_never_sent_turn_a_counts_run_into_a_full_one() {
    let d = delivered_day(200).await;
    let ts = (chrono::Utc::now() - chrono::Duration::seconds(10)).to_rfc3339();
    let r = http()
        .post(format!("{}/v1/events/ingest", d.emu.base))
        .bearer_auth(&d.emu.token)
        .json(&serde_json::json!({"events": [{"name": "never.recorded", "external_customer_id": "initech", "timestamp": ts}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, r) = reconcile(&d, Some("counts")).await;
    assert_eq!(r["mode"], "full", "{r}");
    assert!(r["escalated"].is_string(), "{r}");
    assert_eq!(r["unexpected_at_polar"]["count"], 1);
}

#[tokio::test]
async fn a_run_that_keeps_failing_ends_failed_with_an_alert() {
    let d = delivered_day(10).await;
    d.db.set(&d.pg, "backoff_base", "10 milliseconds").await;
    d.db.set(&d.pg, "reconcile_max_tries", "3").await;
    // Every listing of a window fails; Polar answers everything else.
    d.emu
        .faults(serde_json::json!({"error_5xx": 1.0, "only": ["GET /v1/events/?start_timestamp"]}))
        .await;
    let id: i64 =
        d.pg.query_one(
            "SELECT meter.reconcile_meter_to_polar(now() + interval '1 minute', '1 hour', 'full')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (tries, err): (i32, String) = eventually(60, "the run failed", || async {
        let r =
            d.pg.query_one(
                "SELECT status, attempts, last_error FROM meter.reconcile_run WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (r.get::<_, String>(0) == "failed").then(|| (r.get(1), r.get(2)))
    })
    .await;
    assert_eq!(tries, 3);
    assert!(err.contains("HTTP 5"), "{err}");
    assert_eq!(audit_count(&d.pg, "alert.reconcile_failing").await, 1);
    let kind: String =
        d.pg.value("SELECT kind FROM meter.alert WHERE kind = 'reconcile_failing'")
            .await;
    assert_eq!(kind, "reconcile_failing");
}

#[tokio::test]
async fn no_run_covering_yesterday_by_the_configured_hour_is_overdue() {
    let (db, pg) = TestDb::with_admin().await;
    db.set(&pg, "reconcile_overdue_hour", "0").await;
    let raised: i32 = pg.value("SELECT meter.check_delivery_health()").await;
    assert_eq!(raised, 1);
    assert_eq!(audit_count(&pg, "alert.reconcile_overdue").await, 1);
    // A finished run today over a window ending yesterday or later settles it.
    // One transaction, so that now() is one instant for the run and for the
    // check: a midnight between them would make the run the day before's.
    pg.batch_execute(
        "BEGIN;
         INSERT INTO meter.reconcile_run (window_start, window_end, status, finished_at)
         VALUES (date_trunc('day', now(), 'UTC') - interval '1 day', date_trunc('day', now(), 'UTC') - interval '1 hour',
                 'done', now());
         DELETE FROM meter.alert_state;",
    )
    .await
    .unwrap();
    let raised: i32 = pg.value("SELECT meter.check_delivery_health()").await;
    pg.batch_execute("COMMIT").await.unwrap();
    assert_eq!(raised, 0);
}

#[tokio::test]
async fn an_event_recorded_days_after_its_timestamp_is_reconciled_in_its_own_window() {
    let (db, pg, key) = TestDb::acme().await;
    let emu = Emulator::start(&[]).await;
    let _side = Sidecar::start_with(&db, &emu.sidecar_env()).await;
    // Three days ago's window was reconciled, clean, before the event existed.
    let old: i64 = pg
        .query_one("SELECT meter.reconcile_meter_to_polar(date_trunc('hour', now() - interval '3 days') + interval '12 hours', '24 hours', 'full')", &[])
        .await
        .unwrap()
        .get(0);
    let first = run_done(&pg, old).await;
    assert_eq!(first["local_sent"], 0);
    // The event arrives today, timestamped three days ago, and is delivered.
    let ts = (chrono::Utc::now() - chrono::Duration::days(3)).to_rfc3339();
    pg.execute(
        "SELECT meter.record_event($1, 'late', 'api.request', $2::text)",
        &[&key, &ts],
    )
    .await
    .unwrap();
    eventually(30, "the late event sent", || async {
        (statuses(&pg).await.get("sent") == Some(&1)).then_some(())
    })
    .await;
    // The daily job re-opens that window.
    pg.query_one("SELECT meter.reconcile_meter_to_polar()", &[])
        .await
        .unwrap();
    let again = eventually(60, "the window reconciled again", || async {
        let r = pg
            .query_opt(
                "SELECT r.result FROM meter.reconcile_run r, meter.reconcile_run o
                 WHERE o.id = $1 AND r.id > o.id AND r.window_start = o.window_start AND r.window_end = o.window_end AND r.status = 'done'",
                &[&old],
            )
            .await
            .unwrap();
        r.map(|r| r.get::<_, Value>(0))
    })
    .await;
    assert_eq!(again["local_sent"], 1, "{again}");
    assert_eq!(again["drift"], 0);
}

#[tokio::test]
async fn an_event_given_up_on_that_polar_holds_is_healed_to_sent() {
    let (db, pg) = TestDb::with_admin().await;
    db.set(&pg, "backoff_base", "20 milliseconds").await;
    db.set(&pg, "backoff_cap", "100 milliseconds").await;
    db.org(&pg, "acme").await;
    let (_, key) = db.key(&pg, "acme", &["fence:meter"]).await;
    let emu = Emulator::start(&[]).await;
    let side = Sidecar::start_with(&db, &emu.sidecar_env()).await;
    eventually(30, "acme provisioned", || async {
        let n: i64 = pg
            .value("SELECT count(*) FROM meter.organization WHERE polar_customer_id IS NOT NULL")
            .await;
        (n == 1).then_some(())
    })
    .await;
    // Polar commits every batch and the answer never arrives: seven failures, dropped.
    emu.faults(serde_json::json!({"commit_then_drop": 1.0, "only": ["POST /v1/events/ingest"]}))
        .await;
    record_many(&side, &[("acme".into(), key)], 5, 1).await;
    eventually(60, "dropped after seven tries", || async {
        (statuses(&pg).await.get("dropped") == Some(&5)).then_some(())
    })
    .await;
    emu.faults(serde_json::json!({})).await;
    assert_eq!(
        emu.events().await["events"].as_array().unwrap().len(),
        5,
        "yet Polar holds them (once each)"
    );
    let id: i64 = pg
        .query_one(
            "SELECT meter.reconcile_meter_to_polar(now() + interval '1 minute', '1 hour', 'full')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let r = run_done(&pg, id).await;
    assert_eq!(r["healed"], 5, "{r}");
    assert_eq!(r["drift"], 0);
    assert_eq!(statuses(&pg).await.get("sent"), Some(&5));
    let with_ids: i64 = pg
        .value("SELECT count(*) FROM meter.meter_event WHERE polar_event_id IS NOT NULL")
        .await;
    assert_eq!(with_ids, 5);
    assert_eq!(audit_count(&pg, "event.healed").await, 5);
}

#[tokio::test]
async fn every_missing_event_is_a_finding_beyond_the_hundred_the_result_names() {
    let d = delivered_day(2_500).await;
    let deleted = delete_acme_events(&d.emu, 150).await;
    let (id, r) = reconcile(&d, Some("full")).await;
    assert_eq!(r["missing_at_polar"]["count"], 150);
    assert_eq!(
        r["missing_at_polar"]["event_ids"].as_array().unwrap().len(),
        100
    );
    let found: BTreeSet<String> = d
        .pg
        .query(
            "SELECT event_id FROM meter.reconcile_finding WHERE run_id = $1 AND kind = 'missing_at_polar'",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(found, deleted, "every missing event, by id");
    // From there they can be sent again in one statement.
    let resent: i64 =
        d.pg.query_one(
            "SELECT meter.resend_events(array_agg(event_id::uuid)) FROM meter.reconcile_finding
             WHERE run_id = $1 AND kind = 'missing_at_polar'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(resent, 150);
}

/// A page of 100 of one organization's largest events (49 metadata values of
/// 500 four-byte characters, ~98 KB each) passes the 8 MiB we read of one
/// Polar answer: the page is read again in smaller pages, and the run ends
/// clean rather than failing for every organization.
#[tokio::test]
async fn a_page_too_large_to_read_is_read_in_smaller_pages() {
    let (db, pg) = TestDb::with_admin().await;
    db.org(&pg, "acme").await;
    db.org(&pg, "globex").await;
    let emu = Emulator::start(&[]).await;
    let side = Sidecar::start_with(&db, &emu.sidecar_env()).await;
    let big: serde_json::Map<String, Value> = (0..49)
        .map(|i| (format!("k{i}"), Value::String("😀".repeat(500))))
        .collect();
    let ts = chrono::Utc::now() - chrono::Duration::minutes(5);
    for org in ["acme", "globex"] {
        let n = if org == "acme" { 130 } else { 3 };
        let events: Vec<Value> = (0..n)
            .map(|i| {
                serde_json::json!({"idempotency_key": format!("big-{i}"), "event_name": "e",
                        "event_timestamp": ts.to_rfc3339(), "metadata": big})
            })
            .collect();
        pg.query(
            "SELECT 1 FROM meter.record_events_for_org($1, $2)",
            &[&org, &Value::Array(events)],
        )
        .await
        .unwrap();
    }
    eventually(120, "all delivered", || async {
        (statuses(&pg).await.get("sent").copied() == Some(133)).then_some(())
    })
    .await;
    let id: i64 = pg
        .value(
            "SELECT meter.reconcile_meter_to_polar(now() + interval '1 minute', '1 hour', 'full')",
        )
        .await;
    let r = run_done(&pg, id).await;
    assert_eq!(r["local_sent"], 133, "{r}");
    assert_eq!(r["remote_total"], 133, "{r}");
    assert_eq!(r["drift"], 0, "{r}");
    assert_eq!(r["missing_at_polar"]["count"], 0, "{r}");
    assert!(
        side.logs_text().contains("reading it in smaller pages"),
        "the large page was read in parts"
    );
}
