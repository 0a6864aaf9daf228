//! Reconciliation: Polar's event list against what we recorded, per window.
use pm_e2e::{eventually, http, meterd_cli, record_many, statuses, Emulator, Sidecar, TestDb};
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
    let db = TestDb::new().await;
    let pg = db.admin().await;
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

/// Opens a run over the last hour and waits for the sidecar to finish it.
async fn reconcile(d: &Day) -> (i64, Value) {
    let id: i64 =
        d.pg.query_one(
            "SELECT meter.reconcile_meter_to_polar(now() + interval '1 minute', '1 hour')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let result = eventually(60, "the run done", || async {
        let r =
            d.pg.query_one(
                "SELECT status, result FROM meter.reconcile_run WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (r.get::<_, String>(0) == "done").then(|| r.get::<_, Value>(1))
    })
    .await;
    (id, result)
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
    let (_, r) = reconcile(&d).await;
    assert_eq!(r["local_sent"], 5_000);
    assert_eq!(r["remote_total"], 5_000);
    assert_eq!(r["drift"], 0);
    assert_eq!(r["missing_at_polar"]["count"], 0);
    assert_eq!(r["unexpected_at_polar"]["count"], 0);
    assert_eq!(audit_count(&d.pg, "alert.drift").await, 0);
    assert_eq!(audit_count(&d.pg, "reconcile.clean").await, 1);
    let unmatched: i64 =
        d.pg.query_one(
            "SELECT count(*) FROM meter.meter_event WHERE polar_event_id IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unmatched, 0, "every matched event learned its Polar id");
}

#[tokio::test]
async fn two_percent_missing_for_one_org_is_reported_exactly_and_alerts() {
    let d = delivered_day(2_500).await;
    let deleted = delete_acme_events(&d.emu, 50).await;
    let (id, r) = reconcile(&d).await;
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
    let (_, r) = reconcile(&d).await;
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
