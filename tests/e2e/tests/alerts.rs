//! Alerts are rows first: raised with no sidecar running they are forwarded
//! when one starts; with several sidecars each goes to the webhook once; a
//! failing webhook is retried. NOTIFY is only a wake-up: a forged one
//! forwards nothing, and a flood of them costs neither memory nor delivery.
use pm_e2e::Value1;
use pm_e2e::{
    eventually, idem, now_rfc3339, record_many, statuses, Emulator, Sidecar, TestDb, Webhook,
};
use serde_json::Value;
use std::collections::BTreeSet;

async fn forwarded(pg: &tokio_postgres::Client) -> i64 {
    pg.value("SELECT count(*) FROM meter.alert WHERE status = 'forwarded'")
        .await
}

#[tokio::test]
async fn an_alert_raised_while_no_sidecar_runs_is_forwarded_once_one_starts() {
    let (db, pg) = TestDb::with_admin().await;
    // pg_cron's check finds an organization Polar would refuse, long ago.
    pg.run("INSERT INTO meter.organization (id, name) VALUES ('acme', 'Acme')")
        .await;
    db.set(&pg, "provision_alert_after", "0").await;
    // Today's reconciliation is done, so that past reconcile_overdue_hour
    // (12 UTC) the check raises this alert only, whatever the time of day.
    pg.run(
        "INSERT INTO meter.reconcile_run (window_start, window_end, status, finished_at)
         VALUES (date_trunc('day', now()) - interval '1 day', date_trunc('day', now()), 'done', now())",
    )
    .await;
    let stats: Value = pg.value("SELECT meter.drain_meter_outbox()").await;
    assert_eq!(stats["alerts_raised"], 1);
    let hook = Webhook::start().await;
    let _side = Sidecar::start(&db, &[("ALERT_WEBHOOK_URL", hook.url.as_str())]).await;
    eventually(30, "the alert forwarded", || async {
        (forwarded(&pg).await == 1).then_some(())
    })
    .await;
    let got = hook.bodies();
    assert_eq!(got.len(), 1, "{got:?}");
    let a = &got[0];
    assert_eq!(a["source"], "polar-meter");
    assert_eq!(a["kind"], "customer_provisioning_failed");
    assert_eq!(a["organization_id"], "acme");
    assert_eq!(a["dedup_key"], "customer_provisioning_failed:acme");
    assert!(a["alert_id"].as_str().unwrap().starts_with("acme/"));
    assert!(a["raised_at"].is_string() && a["attempt"] == 1);
    assert!(
        a["detail"]["action"]
            .as_str()
            .unwrap()
            .contains("upsert_organization"),
        "{a}"
    );
    // The condition stands, but repeats only once per alert_repeat_after.
    pg.query_one("SELECT meter.drain_meter_outbox()", &[])
        .await
        .unwrap();
    let n: i64 = pg.value("SELECT count(*) FROM meter.alert").await;
    assert_eq!(n, 1);
}

#[tokio::test]
async fn with_three_sidecars_each_alert_reaches_the_webhook_exactly_once() {
    let (db, pg) = TestDb::with_admin().await;
    pg.run("SELECT meter._alert('drift', 'org' || i, jsonb_build_object('i', i), i::text) FROM generate_series(1, 60) i").await;
    let hook = Webhook::start().await;
    let env = [("ALERT_WEBHOOK_URL", hook.url.as_str())];
    let (_a, _b, _c) = (
        Sidecar::start(&db, &env).await,
        Sidecar::start(&db, &env).await,
        Sidecar::start(&db, &env).await,
    );
    eventually(60, "all forwarded", || async {
        (forwarded(&pg).await == 60).then_some(())
    })
    .await;
    let ids: Vec<String> = hook
        .bodies()
        .iter()
        .map(|b| b["alert_id"].as_str().unwrap().to_string())
        .collect();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), 60, "no alert twice");
    assert_eq!(distinct.len(), 60);
}

#[tokio::test]
async fn a_failing_webhook_is_retried_until_it_takes_the_alert() {
    let (db, pg) = TestDb::with_admin().await;
    pg.run("SELECT meter._alert('outbox_stale', '', '{}')")
        .await;
    let hook = Webhook::failing_first(2).await;
    let _side = Sidecar::start(&db, &[("ALERT_WEBHOOK_URL", hook.url.as_str())]).await;
    eventually(60, "forwarded after two refusals", || async {
        (forwarded(&pg).await == 1).then_some(())
    })
    .await;
    let got = hook.bodies();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["attempt"], 3, "the same alert, on its third try");
    assert_eq!(got[0]["dedup_key"], "outbox_stale:");
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn forged_notifications_forward_nothing_and_a_flood_costs_nothing() {
    let (db, pg, key) = TestDb::acme().await;
    let emu = Emulator::start(&[]).await;
    let hook = Webhook::start().await;
    let mut env = emu.sidecar_env();
    env.push(("ALERT_WEBHOOK_URL".into(), hook.url.clone()));
    let side = Sidecar::start_with(&db, &env).await;
    record_many(&side, &[("acme".into(), key.clone())], 10, 4).await;
    eventually(30, "warm-up delivered", || async {
        (statuses(&pg).await.get("sent") == Some(&10)).then_some(())
    })
    .await;
    let before = rss_kib(side.pid());

    // Anyone who can connect can NOTIFY: a role with no rights at all.
    let nobody = format!("nobody_{}", uuid::Uuid::new_v4().simple());
    pg.run(&format!("CREATE ROLE {nobody} LOGIN")).await;
    let forger = db.client_as(&nobody).await;
    forger
        .run(r#"NOTIFY polar_meter_alert, '{"kind": "forged", "organization_id": "acme", "detail": {"pay": "me"}}'"#).await;
    for _ in 0..100 {
        let flood: String = (0..100)
            .map(|_| {
                format!(
                    "NOTIFY meter_outbox, '{}'; NOTIFY meter_reconcile, 'x'; ",
                    uuid::Uuid::new_v4()
                )
            })
            .collect();
        forger.run(&flood).await;
    }
    // Delivery goes on, promptly.
    let r = pm_e2e::http()
        .post(side.url("/api/v1/meter"))
        .bearer_auth(&key)
        .header("Idempotency-Key", idem())
        .json(&serde_json::json!({"event_name": "after", "event_timestamp": now_rfc3339()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    eventually(15, "the next event delivered", || async {
        (statuses(&pg).await.get("sent") == Some(&11)).then_some(())
    })
    .await;
    // A real alert goes through, and only it.
    pg.run("SELECT meter._alert('drift', '', '{\"real\": true}', 'r1')")
        .await;
    eventually(30, "the real alert forwarded", || async {
        (!hook.kinds().is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        hook.kinds(),
        vec!["drift".to_string()],
        "the forged alert reached no webhook"
    );
    let after = rss_kib(side.pid());
    assert!(
        after < before + 10 * 1024,
        "20k notifications grew memory from {before} to {after} KiB"
    );
}
