//! Every HTTP error polar-meterd answers (README, "Errors"), produced by a real request and
//! checked for status, problem+json and its stable type.
use pm_e2e::Value1;
use pm_e2e::{http, idem, now_rfc3339, Sidecar, TestDb};
use serde_json::{json, Value};

const T: &str = "https://polar-meter.dev/problems/";

async fn check(resp: reqwest::Response, status: u16, slug: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "for {slug}");
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(
        ct.as_deref(),
        Some("application/problem+json"),
        "for {slug}"
    );
    let www = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let retry = resp.headers().get("retry-after").is_some();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], format!("{T}{slug}"), "{v}");
    assert_eq!(v["status"], status);
    assert!(v["title"].is_string() && v["detail"].is_string(), "{v}");
    if status == 401 {
        assert!(
            www.as_deref()
                .is_some_and(|w| w.starts_with("Bearer realm=\"polar-meter\"")),
            "401 carries WWW-Authenticate"
        );
    }
    if status == 503 {
        assert!(retry, "503 carries Retry-After");
    }
    v
}

/// (key, Idempotency-Key, body, status, problem type, a word the detail names)
type Case<'a> = (
    Option<&'a str>,
    Option<String>,
    Vec<u8>,
    u16,
    &'a str,
    &'a str,
);

#[tokio::test]
async fn every_error_has_its_status_and_type() {
    let (db, pg, key) = TestDb::acme().await;
    let (_, manage_only) = db.key(&pg, "acme", &["keys:manage"]).await;
    let (expired_id, expired) = db.key(&pg, "acme", &["fence:meter"]).await;
    pg.execute(
        "UPDATE meter.api_key SET expires_at = now() - interval '1 minute' WHERE id = $1",
        &[&expired_id],
    )
    .await
    .unwrap();
    let (revoked_id, revoked) = db.key(&pg, "acme", &["fence:meter"]).await;
    pg.query_one("SELECT meter.revoke_api_key($1)", &[&revoked_id])
        .await
        .unwrap();
    let side = Sidecar::start(&db, &[]).await;
    let url = side.url("/api/v1/meter");
    let c = http();
    let good = json!({"event_name": "api.request", "event_timestamp": now_rfc3339(), "metadata": {"n": 1}});
    let send = |key: Option<&str>, idem: Option<&str>, ct: Option<&str>, body: Vec<u8>| {
        let mut r = c.post(&url).body(body);
        if let Some(k) = key {
            r = r.header("authorization", format!("Bearer {k}"));
        }
        if let Some(i) = idem {
            r = r.header("idempotency-key", i);
        }
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        r.send()
    };
    let json_ct = Some("application/json");
    let body = |v: &Value| serde_json::to_vec(v).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let unknown = format!("ak_{}", "0".repeat(48));
    let long_idem = "x".repeat(256);
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        (Some(&key), Some(idem()), b"{not json".to_vec(), 400, "malformed-body", ""),
        (Some(&key), Some(idem()), br#"{"event_name":"a"}"#.to_vec(), 400, "invalid-timestamp", "event_timestamp"),
        (Some(&key), Some(idem()), with(&|v| v["event_timestamp"] = json!(17)), 400, "invalid-timestamp", "event_timestamp"),
        (Some(&key), Some(idem()), with(&|v| v["surprise"] = json!(1)), 400, "invalid-event", "surprise"),
        (Some(&key), Some(idem()), b"[1]".to_vec(), 400, "invalid-event", "object"),
        (Some(&key), Some(idem()), br#"{"event_name":"a","event_name":"b","event_timestamp":"2026-01-01T00:00:00Z"}"#.to_vec(), 400, "invalid-event-name", "event_name"),
        (Some(&key), Some(idem()), br#"{"event_name":"a","event_timestamp":"2026-01-01T00:00:00Z","metadata":{"k":1,"k":2}}"#.to_vec(), 400, "invalid-metadata", "metadata.k"),
        (Some(&key), None, body(&good), 400, "invalid-idempotency-key", ""),
        (Some(&key), Some(long_idem), body(&good), 400, "invalid-idempotency-key", ""),
        (Some(&key), Some(idem()), with(&|v| v["event_name"] = json!("n".repeat(129))), 400, "invalid-event-name", "event_name"),
        (Some(&key), Some(idem()), with(&|v| v["metadata"] = json!({"deep": {"x": 1}})), 400, "invalid-metadata", "metadata.deep"),
        (Some(&key), Some(idem()), with(&|v| v["metadata"] = json!({"nul": "a\u{0}b"})), 400, "invalid-metadata", "metadata.nul"),
        (Some(&key), Some(idem()), with(&|v| v["event_timestamp"] = json!("2026-01-01T00:00:00")), 400, "invalid-timestamp", "event_timestamp"),
        (Some(&key), Some(idem()), with(&|v| v["event_timestamp"] = json!("2999-01-01T00:00:00Z")), 400, "timestamp-in-future", "event_timestamp"),
        (None, Some(idem()), body(&good), 401, "missing-credentials", ""),
        (Some("ak_nope"), Some(idem()), body(&good), 401, "malformed-api-key", ""),
        (Some(&unknown), Some(idem()), body(&good), 401, "unknown-api-key", ""),
        (Some(&revoked), Some(idem()), body(&good), 401, "revoked-api-key", ""),
        (Some(&expired), Some(idem()), body(&good), 401, "expired-api-key", ""),
        (Some(&manage_only), Some(idem()), body(&good), 403, "insufficient-permission", ""),
    ];
    for (k, i, b, status, slug, names) in cases {
        let v = check(
            send(k, i.as_deref(), json_ct, b).await.unwrap(),
            status,
            slug,
        )
        .await;
        assert!(v["detail"].as_str().unwrap().contains(names), "{slug}: {v}");
    }
    check(
        c.post(&url)
            .header("authorization", "Basic dXNlcjpwdw==")
            .header("idempotency-key", "x")
            .json(&good)
            .send()
            .await
            .unwrap(),
        401,
        "missing-credentials",
    )
    .await;
    // 413: declared, and streamed without a length.
    let big = with(&|v| v["metadata"] = json!({"s": "x".repeat(70_000)}));
    check(
        send(Some(&key), Some(&idem()), json_ct, big.clone())
            .await
            .unwrap(),
        413,
        "body-too-large",
    )
    .await;
    let stream = reqwest::Body::wrap_stream(futures_util::stream::iter(
        big.chunks(8192)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    ));
    // The server answers 413 once the limit is crossed, and reads on (within
    // a bound) so that a client still writing gets that answer, not a reset.
    let streamed = c
        .post(&url)
        .bearer_auth(&key)
        .header("idempotency-key", idem())
        .header("content-type", "application/json")
        .body(stream)
        .send()
        .await
        .unwrap();
    check(streamed, 413, "body-too-large").await;
    // 415
    for ct in [Some("text/plain"), None] {
        let r = send(Some(&key), Some(&idem()), ct, body(&good))
            .await
            .unwrap();
        check(r, 415, "unsupported-media-type").await;
    }
    // 422
    let k = idem();
    assert_eq!(
        send(Some(&key), Some(&k), json_ct, body(&good))
            .await
            .unwrap()
            .status(),
        202
    );
    check(
        send(
            Some(&key),
            Some(&k),
            json_ct,
            with(&|v| v["metadata"]["n"] = json!(2)),
        )
        .await
        .unwrap(),
        422,
        "idempotency-key-reused",
    )
    .await;
    // 404 / 405
    check(
        c.get(side.url("/nope")).send().await.unwrap(),
        404,
        "not-found",
    )
    .await;
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["allow"], "POST");
    check(r, 405, "method-not-allowed").await;

    // None of the refused requests left a row; only the one 202 did.
    let n: i64 = pg.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(n, 1);
}

/// A JSON body as sent, with the key; the answer's JSON.
async fn post(r: reqwest::RequestBuilder, key: &str, body: String) -> Value {
    r.bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// One rule, one answer: an event refused by POST /api/v1/meter gets the
/// same problem type and detail as the same event inside a batch, where it
/// is refused alone and its neighbour is recorded.
#[tokio::test]
async fn the_same_event_gets_the_same_answer_from_both_endpoints() {
    let (db, pg, key) = TestDb::acme().await;
    let side = Sidecar::start(&db, &[]).await;
    let ts = "2026-01-01T00:00:00Z";
    let events: Vec<&str> = vec![
        r#"{"event_name":17,"event_timestamp":"2026-01-01T00:00:00Z"}"#,
        r#"{"event_name":"a"}"#,
        r#"{"event_name":"a","event_timestamp":"yesterday"}"#,
        r#"{"event_name":"a","event_timestamp":"2026-01-01T00:00:00Z","colour":"red"}"#,
        r#"{"event_name":"a","event_timestamp":"2026-01-01T00:00:00Z","metadata":{"deep":{"x":1}}}"#,
        r#"{"event_name":"a","event_timestamp":"2026-01-01T00:00:00Z","metadata":{"k":"a\u0000b"}}"#,
        r#"{"event_name":"a","event_timestamp":"2026-01-01T00:00:00Z","metadata":{"n":1e400}}"#,
        r#"{"event_name":"a","event_name":"b","event_timestamp":"2026-01-01T00:00:00Z"}"#,
        r#"{"event_name":"a","event_timestamp":"2026-01-01T00:00:00Z","metadata":{"k":1,"k":1}}"#,
        r#""not an object""#,
    ];
    for (n, e) in events.iter().enumerate() {
        let single = post(
            http()
                .post(side.url("/api/v1/meter"))
                .header("idempotency-key", format!("s{n}")),
            &key,
            e.to_string(),
        )
        .await;
        // In a batch the key travels in the item.
        let item = match serde_json::from_str::<Value>(e) {
            Ok(Value::Object(_)) => e.replacen('{', &format!(r#"{{"idempotency_key":"b{n}","#), 1),
            _ => e.to_string(),
        };
        let good =
            format!(r#"{{"idempotency_key":"ok{n}","event_name":"a","event_timestamp":"{ts}"}}"#);
        let batch = post(
            http().post(side.url("/api/v1/meter/batch")),
            &key,
            format!(r#"{{"events":[{item},{good}]}}"#),
        )
        .await;
        let problem = &batch["results"][0]["problem"];
        assert_eq!(
            single["type"], problem["type"],
            "{e}: {single} against {batch}"
        );
        assert_eq!(single["detail"], problem["detail"], "{e}");
        assert!(single["type"].as_str().unwrap().starts_with(T), "{single}");
        assert_eq!(batch["results"][1]["status"], "recorded", "{e}: {batch}");
    }
    let n: i64 = pg.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(
        n,
        events.len() as i64,
        "only the good neighbours were recorded"
    );
}
