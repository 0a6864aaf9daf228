//! Discovery, health, readiness, metrics and graceful shutdown.
use pm_e2e::{http, idem, now_rfc3339, Sidecar, TestDb};
use pm_e2e::{Fetch, Value1};
use serde_json::{json, Value};

#[tokio::test]
async fn discovery_health_readiness_and_metrics() {
    let (db, _pg, key) = TestDb::acme().await;
    let side = Sidecar::start(&db, &[]).await;
    let c = http();

    let r = c
        .get(side.url("/.well-known/agent-configuration"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("max-age"));
    let doc: Value = r.json().await.unwrap();
    let schemes: Vec<&str> = doc["auth_schemes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["type"].as_str().unwrap())
        .collect();
    assert_eq!(schemes, ["api_key", "session_cookie", "paseto"]);
    assert_eq!(doc["auth_schemes"][2]["accepted"], false);
    assert_eq!(doc["endpoints"]["meter"]["path"], "/api/v1/meter");

    let h: Value = c.get(side.url("/healthz")).fetch_json().await;
    assert_eq!(h["status"], "ok");
    // The API listener answers load balancers with a bare 200 or 503; the
    // report is the admin listener's, and so is /metrics.
    let bare: Value = c.get(side.url("/readyz")).fetch_json().await;
    assert_eq!(bare, json!({"status": "ready"}));
    let r = c.get(side.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404, "no metrics on the API listener");
    let r = c.get(side.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ready: Value = r.json().await.unwrap();
    assert_eq!(ready["extension_version"], ready["version"]);
    assert_eq!(ready["polar_version"], "2026-04");
    let v = std::process::Command::new(pm_e2e::binary("polar-meterd"))
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&v.stdout);
    assert!(
        text.contains("polar_meter extension") && text.contains("Polar-Version 2026-04"),
        "{text}"
    );

    for i in 0..3 {
        let k = if i == 2 { "fixed".to_string() } else { idem() };
        let body = json!({"event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z"});
        c.post(side.url("/api/v1/meter"))
            .bearer_auth(&key)
            .header("Idempotency-Key", &k)
            .json(&body)
            .send()
            .await
            .unwrap();
    }
    let body = json!({"event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z"});
    c.post(side.url("/api/v1/meter"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "fixed")
        .json(&body)
        .send()
        .await
        .unwrap();
    c.post(side.url("/api/v1/meter")).send().await.unwrap();
    let r = c.get(side.admin_url("/metrics")).send().await.unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let m = r.text().await.unwrap();
    assert!(
        m.contains(
            "polar_meter_http_requests_total{route=\"POST /api/v1/meter\",status=\"202\"} 4"
        ),
        "{m}"
    );
    assert!(
        m.contains(
            "polar_meter_http_requests_total{route=\"POST /api/v1/meter\",status=\"401\"} 1"
        ),
        "{m}"
    );
    assert!(
        m.contains("polar_meter_events_total{status=\"recorded\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("polar_meter_events_total{status=\"already_recorded\"} 1"),
        "{m}"
    );
    assert!(
        m.contains(
            "polar_meter_http_request_duration_seconds_count{route=\"POST /api/v1/meter\"} 5"
        ),
        "{m}"
    );
    assert!(
        m.contains("polar_meter_db_pool_connections{pool=\"requests\",state=\"max\"} 32"),
        "{m}"
    );
}

#[tokio::test]
async fn readyz_fails_when_the_extension_version_differs() {
    let (db, pg) = TestDb::with_admin().await;
    // Pretend the database holds another version of the extension.
    pg.run("UPDATE pg_extension SET extversion = '0.0.1' WHERE extname = 'polar_meter'")
        .await;
    let side = Sidecar::start(&db, &[]).await;
    let r = http().get(side.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let bare: Value = r.json().await.unwrap();
    assert_eq!(bare["type"], "https://polar-meter.dev/problems/not-ready");
    assert!(
        !bare.to_string().contains("0.0.1"),
        "no details on the API listener: {bare}"
    );
    let r = http().get(side.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["type"],
        "https://polar-meter.dev/problems/extension-version-mismatch"
    );
    assert!(v["detail"].as_str().unwrap().contains("0.0.1"));
}

#[tokio::test]
async fn readyz_keeps_a_sidecar_in_rotation_while_a_newer_extension_still_serves_it() {
    let (db, pg) = TestDb::with_admin().await;
    // ALTER EXTENSION ... UPDATE ran first (rolling upgrade): a newer version
    // that still serves this binary keeps it ready.
    pg.run("UPDATE pg_extension SET extversion = '0.5.0' WHERE extname = 'polar_meter'")
        .await;
    let side = Sidecar::start(&db, &[]).await;
    let r = http().get(side.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["extension_version"], "0.5.0");
    assert_eq!(v["delivery"]["enabled"], false, "{v}");
    // One that no longer serves it takes it out of rotation.
    pg.run("CREATE OR REPLACE FUNCTION meter.oldest_supported_sidecar() RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT '9.0.0'::text $$").await;
    let r = http().get(side.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert!(v["detail"].as_str().unwrap().contains("9.0.0"), "{v}");
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let (db, pg, key) = TestDb::acme().await;
    let side = Sidecar::start(&db, &[]).await;
    let ts = now_rfc3339();

    // A DBA transaction holds the idempotency key, so the HTTP request waits
    // inside record_event until it commits.
    let blocker = db.admin().await;
    blocker.run("BEGIN").await;
    blocker
        .query_one(
            "SELECT * FROM meter.record_event_for_org('acme', 'held', 'e', $1::text)",
            &[&ts],
        )
        .await
        .unwrap();
    let url = side.url("/api/v1/meter");
    let (k, t) = (key.clone(), ts.clone());
    let in_flight = tokio::spawn(async move {
        let r = http()
            .post(url)
            .bearer_auth(k)
            .header("Idempotency-Key", "held")
            .json(&json!({"event_name": "e", "event_timestamp": t}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    pm_e2e::eventually(20, "the request to wait on the lock", || {
        let pg = &pg;
        async move {
            let n: i64 = pg
                .value("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'").await;
            (n > 0).then_some(())
        }
    })
    .await;
    let base = side.base.clone();
    let exit = tokio::spawn(side.terminate());
    // Once shutdown began, no new connection is accepted.
    pm_e2e::eventually(20, "the listener to close", || {
        let base = base.clone();
        async move {
            http()
                .get(format!("{base}/healthz"))
                .send()
                .await
                .is_err()
                .then_some(())
        }
    })
    .await;
    blocker.run("COMMIT").await;
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("already_recorded")),
        "{body}"
    );
    let code = exit.await.unwrap();
    assert!(code.success(), "exit status {code:?}");
}
