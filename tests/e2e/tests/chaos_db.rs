//! The database going away under load: 503 + Retry-After, no crash, and
//! recovery without a restart once it is back. Uses a cluster of its own so
//! stopping it disturbs no other suite.
use pm_e2e::Value1;
use pm_e2e::{connect_port, http, idem, now_rfc3339, repo_root, Sidecar};
use serde_json::{json, Value};
use std::process::Command;

// Below the ephemeral range: the cluster restarts while clients come and go.
const PORT: u16 = 25439;

fn cluster(args: &[&str]) {
    let st = Command::new(repo_root().join("scripts/cluster.sh"))
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "cluster.sh {args:?}");
}

#[tokio::test]
async fn database_stopped_mid_run_gives_503_then_recovers() {
    cluster(&["destroy", "chaos-db"]);
    cluster(&["start", "chaos-db", &PORT.to_string(), "postgres"]);
    let admin = connect_port("postgres", "postgres", PORT).await;
    admin.run("CREATE DATABASE chaos").await;
    let pg = connect_port("chaos", "postgres", PORT).await;
    pg.run("CREATE EXTENSION polar_meter; INSERT INTO meter.organization VALUES ('acme', 'acme')")
        .await;
    let key: String = pg
        .value("SELECT key FROM meter.create_api_key('acme', 'k')")
        .await;
    let side = Sidecar::start_on("chaos", PORT, &[]).await;
    let c = http();
    let send = || {
        c.post(side.url("/api/v1/meter"))
            .bearer_auth(&key)
            .header("Idempotency-Key", idem())
            .json(&json!({"event_name": "e", "event_timestamp": now_rfc3339()}))
            .send()
    };
    for _ in 0..5 {
        assert_eq!(send().await.unwrap().status(), 202);
    }

    cluster(&["stop", "chaos-db"]);
    let mut unavailable = 0;
    for _ in 0..10 {
        let r = send().await.expect("the sidecar keeps answering");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "2");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["type"],
            "https://polar-meter.dev/problems/database-unavailable"
        );
        unavailable += 1;
    }
    assert_eq!(unavailable, 10);
    assert_eq!(
        http()
            .get(side.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "process still up"
    );
    assert_eq!(
        http()
            .get(side.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );

    cluster(&["start", "chaos-db", &PORT.to_string(), "postgres"]);
    pm_e2e::eventually(30, "202s again after the database returned", || async {
        (send().await.ok()?.status() == 202).then_some(())
    })
    .await;
    for _ in 0..5 {
        assert_eq!(send().await.unwrap().status(), 202);
    }
    let pg = connect_port("chaos", "postgres", PORT).await;
    let n: i64 = pg.value("SELECT count(*) FROM meter.meter_event").await;
    assert!(n >= 11, "5 before, at least 1 + 5 after: {n}");
    assert!(!side.logs_text().contains("panicked"));
    drop(side);
    cluster(&["destroy", "chaos-db"]);
}
