//! /metrics as an operator pages on it: Polar calls by endpoint and outcome,
//! delivery results, the outbox and reconciliation as the database reports
//! them, alerts, and whether delivery is paused; and promtool accepts it.
use pm_e2e::Fetch;
use pm_e2e::Value1;
use pm_e2e::{eventually, http, record_many, statuses, Emulator, Sidecar, TestDb};

#[tokio::test]
async fn delivery_metrics_are_exposed_and_promtool_accepts_them() {
    let (db, pg, key) = TestDb::acme().await;
    let emu = Emulator::start(&[]).await;
    let side = Sidecar::start_with(&db, &emu.sidecar_env()).await;
    record_many(&side, &[("acme".into(), key)], 50, 8).await;
    eventually(30, "delivered", || async {
        (statuses(&pg).await.get("sent") == Some(&50)).then_some(())
    })
    .await;
    pg.run("SELECT meter.reconcile_meter_to_polar(now() + interval '1 minute', '1 hour', 'counts'); SELECT meter._alert('drift', '', '{}')").await;
    let text = eventually(
        30,
        "the reconcile run and the alert in /metrics",
        || async {
            let t = http().get(side.admin_url("/metrics")).fetch_text().await;
            (t.contains("polar_meter_reconcile_last_age_seconds")
                && t.contains("polar_meter_alerts_raised_total 1"))
            .then_some(t)
        },
    )
    .await;
    for needle in [
        "polar_meter_polar_requests_total{endpoint=\"POST /v1/events/ingest\",outcome=\"2xx\"}",
        "polar_meter_polar_requests_total{endpoint=\"POST /v1/customers/\",outcome=\"2xx\"} 1",
        "polar_meter_delivery_events_total{result=\"delivered\"} 50",
        "polar_meter_delivery_events_total{result=\"rejected\"} 0",
        "polar_meter_delivery_events_total{result=\"dropped\"} 0",
        "polar_meter_outbox_events{status=\"pending\"} 0",
        "polar_meter_outbox_oldest_due_age_seconds 0",
        "polar_meter_outbox_waiting_for_customer_events 0",
        "polar_meter_reconcile_last_drift 0",
        "polar_meter_delivery_paused 0",
        "polar_meter_alerts_forwarded_total",
        "polar_meter_group_commits_total",
        "polar_meter_batches_in_progress 0",
        "polar_meter_group_commit_pending_events 0",
        "polar_meter_db_pool_connections{pool=\"background\",state=\"max\"}",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; make test installs it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
