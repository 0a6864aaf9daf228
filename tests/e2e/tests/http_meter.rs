//! POST /api/v1/meter end to end: a real polar-meterd, logged in as the
//! least-privilege role, in front of a real database.
use pm_e2e::{http, idem, now_rfc3339, Sidecar, TestDb};
use pm_e2e::{Fetch, Value1};
use serde_json::{json, Value};

struct Env {
    db: TestDb,
    side: Sidecar,
    key: String,
    key_id: uuid::Uuid,
    pg: tokio_postgres::Client,
}

async fn env() -> Env {
    let (db, pg) = TestDb::with_admin().await;
    db.org(&pg, "acme").await;
    let (key_id, key) = db.key(&pg, "acme", &["fence:meter"]).await;
    let side = Sidecar::start(&db, &[]).await;
    Env {
        db,
        side,
        key,
        key_id,
        pg,
    }
}

async fn post(e: &Env, key: &str, idem: &str, body: &Value) -> (u16, Value) {
    let r = http()
        .post(e.side.url("/api/v1/meter"))
        .bearer_auth(key)
        .header("Idempotency-Key", idem)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn event() -> Value {
    json!({"event_name": "api.request", "event_timestamp": now_rfc3339(), "metadata": {"tokens": 12, "model": "m"}})
}

#[tokio::test]
async fn happy_path_replay_and_one_row() {
    let e = env().await;
    let k = idem();
    let body = event();
    let (s, v) = post(&e, &e.key, &k, &body).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["status"], "recorded");
    let id: uuid::Uuid = v["event_id"].as_str().unwrap().parse().unwrap();
    let row = e
        .pg
        .query_one("SELECT organization_id, event_name, metadata, api_key_id, polar_status FROM meter.meter_event WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "acme");
    assert_eq!(row.get::<_, String>(1), "api.request");
    assert_eq!(row.get::<_, Value>(2), json!({"tokens": 12, "model": "m"}));
    assert_eq!(row.get::<_, uuid::Uuid>(3), e.key_id);
    assert_eq!(row.get::<_, String>(4), "pending");

    let (s2, v2) = post(&e, &e.key, &k, &body).await;
    assert_eq!(
        (s2, v2["status"].as_str(), v2["event_id"].as_str()),
        (202, Some("already_recorded"), v["event_id"].as_str())
    );
    let n: i64 = e.pg.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(n, 1);
}

#[tokio::test]
async fn revoking_in_sql_or_over_http_refuses_the_very_next_request() {
    let e = env().await;
    assert_eq!(post(&e, &e.key, &idem(), &event()).await.0, 202);
    e.pg.query_one("SELECT meter.revoke_api_key($1)", &[&e.key_id])
        .await
        .unwrap();
    let (s, v) = post(&e, &e.key, &idem(), &event()).await;
    assert_eq!(
        (s, v["type"].as_str()),
        (
            401,
            Some("https://polar-meter.dev/problems/revoked-api-key")
        )
    );

    // Over HTTP, with a keys:manage key of the same org.
    let (id2, key2) = e.db.key(&e.pg, "acme", &["fence:meter"]).await;
    let (_, admin) = e.db.key(&e.pg, "acme", &["keys:manage"]).await;
    assert_eq!(post(&e, &key2, &idem(), &event()).await.0, 202);
    let r = http()
        .delete(e.side.url(&format!("/api/v1/api-keys/{id2}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, v) = post(&e, &key2, &idem(), &event()).await;
    assert_eq!(
        (s, v["type"].as_str()),
        (
            401,
            Some("https://polar-meter.dev/problems/revoked-api-key")
        )
    );
}

#[tokio::test]
async fn sixty_four_concurrent_requests_with_one_key_record_once() {
    let e = env().await;
    let k = idem();
    let body = event();
    let client = http();
    let reqs = (0..64).map(|_| {
        let (client, url, key, k, body) = (
            client.clone(),
            e.side.url("/api/v1/meter"),
            e.key.clone(),
            k.clone(),
            body.clone(),
        );
        async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .header("Idempotency-Key", k)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    });
    let results = futures_util::future::join_all(reqs).await;
    assert!(results.iter().all(|r| r.0 == 202), "{results:?}");
    let recorded = results
        .iter()
        .filter(|r| r.1["status"] == "recorded")
        .count();
    let already = results
        .iter()
        .filter(|r| r.1["status"] == "already_recorded")
        .count();
    assert_eq!((recorded, already), (1, 63));
    let ids: std::collections::HashSet<&str> = results
        .iter()
        .map(|r| r.1["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1);
    let n: i64 = e.pg.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(n, 1);
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let e = env().await;
    post(&e, &e.key, &idem(), &event()).await;
    post(&e, &format!("ak_{}", "Q".repeat(48)), &idem(), &event()).await;
    post(&e, "ak_short_and_wrong", &idem(), &event()).await;
    let (_, admin) =
        e.db.key(&e.pg, "acme", &["fence:meter", "keys:manage"])
            .await;
    let created: Value = http()
        .post(e.side.url("/api/v1/api-keys"))
        .bearer_auth(&admin)
        .json(&json!({"name": "ci"}))
        .fetch_json()
        .await;
    let new_key = created["key"].as_str().unwrap().to_string();
    // Read the metrics so the logs surely include the requests above.
    http()
        .get(e.side.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    let logs = e.side.logs_text();
    assert!(
        logs.contains("api key created over HTTP"),
        "logs are captured"
    );
    for secret in [&e.key, &admin, &new_key, &"Q".repeat(48)] {
        assert!(!logs.contains(&secret[3..]), "a key leaked into the logs");
    }
    assert!(!logs.contains("ak_short_and_wrong"));
}
