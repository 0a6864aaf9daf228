//! POST /api/v1/meter/batch, and group commit of single requests: each item
//! judged alone and answered in request order, the same idempotency as the
//! single endpoint, a bad envelope refused whole, and a batch that fails as
//! a whole retried item by item.
use futures_util::StreamExt;
use pm_e2e::{http, Sidecar, TestDb};
use pm_e2e::{Fetch, Value1};
use serde_json::{json, Value};

async fn setup(env: &[(&str, &str)]) -> (TestDb, tokio_postgres::Client, String, Sidecar) {
    let (db, pg, key) = TestDb::acme().await;
    let side = Sidecar::start(&db, env).await;
    (db, pg, key, side)
}

async fn batch(side: &Sidecar, key: &str, body: &Value) -> (u16, Value) {
    let r = http()
        .post(side.url("/api/v1/meter/batch"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn batch_raw(side: &Sidecar, key: &str, body: &str) -> (u16, Value) {
    let r = http()
        .post(side.url("/api/v1/meter/batch"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn item(k: &str, name: &str, n: i64) -> Value {
    json!({"idempotency_key": k, "event_name": name, "event_timestamp": "2026-01-01T00:00:00Z", "metadata": {"n": n}})
}

#[tokio::test]
async fn each_item_is_judged_alone_and_answered_in_request_order() {
    let (_db, pg, key, side) = setup(&[]).await;
    let (status, v) = batch(
        &side,
        &key,
        &json!({"events": [item("a", "api.request", 1), item("b", "", 1), item("c", "api.request", 1),
                            item("a", "api.request", 1), item("a", "api.request", 2), json!("not an event")]}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 6);
    assert_eq!(r[0]["status"], "recorded");
    assert_eq!(r[1]["status"], "error");
    assert_eq!(
        r[1]["problem"]["type"],
        "https://polar-meter.dev/problems/invalid-event-name"
    );
    assert_eq!(
        (
            r[1]["problem"]["status"].as_u64(),
            r[1]["problem"]["index"].as_u64()
        ),
        (Some(400), Some(1))
    );
    assert!(r[1]["problem"]["detail"]
        .as_str()
        .unwrap()
        .contains("event_name"));
    assert_eq!(r[2]["status"], "recorded");
    assert_eq!(
        r[3]["status"], "already_recorded",
        "the first of a key in request order wins"
    );
    assert_eq!(r[3]["event_id"], r[0]["event_id"]);
    assert_eq!(
        r[4]["problem"]["type"],
        "https://polar-meter.dev/problems/idempotency-key-reused"
    );
    assert_eq!(
        (
            r[4]["problem"]["status"].as_u64(),
            r[4]["problem"]["index"].as_u64()
        ),
        (Some(422), Some(4))
    );
    assert_eq!(
        r[5]["problem"]["type"],
        "https://polar-meter.dev/problems/invalid-event"
    );
    let (rows, audited): (i64, i64) = {
        let row = pg
            .query_one(
                "SELECT (SELECT count(*) FROM meter.meter_event), (SELECT count(*) FROM meter.audit_log WHERE action = 'event.recorded')",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        (rows, audited),
        (2, 2),
        "one row and one audit row per recorded event"
    );
}

#[tokio::test]
async fn a_batch_shares_idempotency_with_the_single_endpoint() {
    let (_db, _pg, key, side) = setup(&[]).await;
    let single = http()
        .post(side.url("/api/v1/meter"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "shared")
        .json(&json!({"event_name": "api.request", "event_timestamp": "2026-01-01T00:00:00Z", "metadata": {"n": 1}}))
        .send()
        .await
        .unwrap();
    let single: Value = single.json().await.unwrap();
    let (_, v) = batch(
        &side,
        &key,
        &json!({"events": [item("shared", "api.request", 1), item("shared", "api.request", 9)]}),
    )
    .await;
    assert_eq!(v["results"][0]["status"], "already_recorded");
    assert_eq!(v["results"][0]["event_id"], single["event_id"]);
    assert_eq!(v["results"][1]["problem"]["status"], 422);
}

#[tokio::test]
async fn a_bad_envelope_is_refused_whole() {
    let (_db, pg, key, side) = setup(&[("POLAR_METER_BATCH_MAX_BODY_BYTES", "200000")]).await;
    let many: Vec<Value> = (0..1001).map(|i| item(&format!("k{i}"), "e", i)).collect();
    let huge: Vec<Value> = (0..1000).map(|i| json!({"idempotency_key": format!("h{i}"), "event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z", "metadata": {"s": "x".repeat(400)}})).collect();
    for (body, want, slug) in [
        (json!([item("a", "e", 1)]), 400, "malformed-body"),
        (json!({"events": {}}), 400, "invalid-batch"),
        (json!({"events": []}), 400, "invalid-batch"),
        (json!({"events": many}), 400, "invalid-batch"),
        (
            json!({"events": [item("a", "e", 1)], "extra": true}),
            400,
            "malformed-body",
        ),
        (json!({"events": huge}), 413, "body-too-large"),
    ] {
        let (status, v) = batch(&side, &key, &body).await;
        assert_eq!(status, want, "{v}");
        assert_eq!(
            v["type"],
            format!("https://polar-meter.dev/problems/{slug}"),
            "{v}"
        );
    }
    let dup = http()
        .post(side.url("/api/v1/meter/batch"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(r#"{"events": [{"idempotency_key": "a", "idempotency_key": "b", "event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z"}]}"#)
        .send()
        .await
        .unwrap();
    // An ambiguous item is refused alone, naming the field found twice.
    assert_eq!(dup.status(), 202);
    let v: Value = dup.json().await.unwrap();
    assert_eq!(
        v["results"][0]["problem"]["type"],
        "https://polar-meter.dev/problems/invalid-idempotency-key",
        "{v}"
    );
    assert!(
        v["results"][0]["problem"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("idempotency_key appears twice"),
        "{v}"
    );
    // The envelope is the request's: "events" twice is refused whole.
    let (status, v) = batch_raw(
        &side,
        &key,
        r#"{"events": [], "events": [{"idempotency_key": "z", "event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z"}]}"#,
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["type"], "https://polar-meter.dev/problems/malformed-body");
    // Key errors are the whole request's too.
    let (status, _) = batch(&side, "ak_nope", &json!({"events": [item("a", "e", 1)]})).await;
    assert_eq!(status, 401);
    let n: i64 = pg.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(n, 0, "nothing was recorded from any of them");
}

#[tokio::test]
async fn a_value_postgresql_cannot_store_fails_its_item_alone() {
    let (_db, pg, key, side) = setup(&[]).await;
    // jsonb cannot hold \u0000 (it would fail the set-based call as a
    // whole): the item is answered before the call, naming its field, and
    // its neighbours are recorded.
    let body = r#"{"events": [
        {"idempotency_key": "ok-1", "event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z"},
        {"idempotency_key": "nul", "event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z", "metadata": {"k": "a\u0000b"}},
        {"idempotency_key": "ok-2", "event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z"}]}"#;
    let r = http()
        .post(side.url("/api/v1/meter/batch"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    let statuses: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["recorded", "error", "recorded"]);
    assert_eq!(
        v["results"][1]["problem"]["type"],
        "https://polar-meter.dev/problems/invalid-metadata"
    );
    assert!(
        v["results"][1]["problem"]["detail"]
            .as_str()
            .unwrap()
            .contains("metadata.k"),
        "{v}"
    );
    let n: i64 = pg.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(n, 2);
}

#[tokio::test]
async fn concurrent_single_requests_are_group_committed_and_answered_one_by_one() {
    let (_db, pg, key, side) = setup(&[]).await;
    let client = http();
    let url = side.url("/api/v1/meter");
    let answers: Vec<(usize, u16, Value)> = futures_util::stream::iter(0..400usize)
        .map(|i| {
            let (client, url, key) = (client.clone(), url.clone(), key.clone());
            async move {
                // Every tenth is invalid: it fails alone.
                let name = if i % 10 == 0 {
                    String::new()
                } else {
                    "api.request".into()
                };
                let r = client
                    .post(url)
                    .bearer_auth(key)
                    .header("Idempotency-Key", format!("g-{i}"))
                    .json(&json!({"event_name": name, "event_timestamp": "2026-01-01T00:00:00Z"}))
                    .send()
                    .await
                    .unwrap();
                (i, r.status().as_u16(), r.json().await.unwrap())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for (i, status, v) in &answers {
        if i % 10 == 0 {
            assert_eq!(
                (*status, v["type"].as_str()),
                (
                    400,
                    Some("https://polar-meter.dev/problems/invalid-event-name")
                )
            );
        } else {
            assert_eq!(
                (*status, v["status"].as_str()),
                (202, Some("recorded")),
                "{v}"
            );
        }
    }
    let n: i64 = pg.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(n, 360);
    let m = http().get(side.admin_url("/metrics")).fetch_text().await;
    let metric = |name: &str| -> u64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let (calls, events) = (
        metric("polar_meter_group_commits_total "),
        metric("polar_meter_group_commit_events_total "),
    );
    assert_eq!(events, 400);
    assert!(
        calls < events,
        "concurrent requests shared calls: {calls} calls for {events} events"
    );
    // Idempotency holds across group commits: a key again is already_recorded.
    let r = http()
        .post(side.url("/api/v1/meter"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "g-1")
        .json(&json!({"event_name": "api.request", "event_timestamp": "2026-01-01T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "already_recorded", "{v}");
}

/// serde_json reads 128 levels of nesting; one item's metadata can hold more,
/// and that must fail the item, not the call (it once came back as a 500).
#[tokio::test]
async fn deeply_nested_metadata_fails_its_item_alone() {
    let (_db, pg, key, side) = setup(&[]).await;
    let deep = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));
    let events = format!(
        r#"[{{"idempotency_key":"deep","event_name":"e","event_timestamp":"2026-01-01T00:00:00Z","metadata":{{"n":{deep}}}}}, {}]"#,
        item("fine", "e", 1)
    );
    let rows = pg
        .query(
            "SELECT status, sqlstate, message FROM meter.record_events($1, $2::text::jsonb) ORDER BY idx",
            &[&key, &events],
        )
        .await
        .unwrap();
    let row = |i: usize| {
        let r = &rows[i];
        let s: (String, Option<String>, Option<String>) = (r.get(0), r.get(1), r.get(2));
        s
    };
    assert_eq!(rows.len(), 2);
    let (status, code, message) = row(0);
    assert_eq!((status.as_str(), code.as_deref()), ("error", Some("PM013")));
    assert!(message.unwrap().contains("metadata.n"));
    assert_eq!(row(1).0, "recorded", "its neighbour is recorded");

    // Over HTTP: the deepest single event the sidecar reads is one level
    // deeper inside the batch a group commit sends.
    let body = |k: usize| {
        format!(
            r#"{{"event_name":"e","event_timestamp":"2026-01-01T00:00:00Z","metadata":{{"n":{}1{}}}}}"#,
            "[".repeat(k),
            "]".repeat(k)
        )
    };
    let k = (100..200)
        .take_while(|&k| serde_json::from_str::<Value>(&body(k)).is_ok())
        .last()
        .unwrap();
    assert!(serde_json::from_str::<Value>(&format!("[{}]", body(k))).is_err());
    let r = http()
        .post(side.url("/api/v1/meter"))
        .bearer_auth(&key)
        .header("idempotency-key", "deep-http")
        .header("content-type", "application/json")
        .body(body(k))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["type"], "https://polar-meter.dev/problems/invalid-metadata",
        "{v}"
    );
    let n: i64 = pg.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(n, 1, "only the good neighbour is stored");
}
