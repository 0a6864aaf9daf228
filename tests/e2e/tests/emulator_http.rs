//! The Polar emulator's own contract, over real HTTP: what the SDK
//! conformance check cannot reach (raw framing, scopes, versions, redirects,
//! rate limits, visibility delay and each injected fault). The sidecar's
//! tests are only as good as this emulator is faithful.
use pm_e2e::{eventually, http, Emulator};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn events(ids: std::ops::Range<usize>) -> Value {
    let events: Vec<Value> = ids
        .map(|i| {
            json!({
                "name": "api.request",
                "external_customer_id": "org-1",
                "external_id": format!("e{i}"),
                "metadata": {"kind": if i % 3 == 0 { "x" } else { "y" }},
            })
        })
        .collect();
    json!({ "events": events })
}

/// POST /v1/events/ingest with `client`; the faults that answer nothing
/// need the transport result itself.
async fn send_ingest(
    client: &reqwest::Client,
    emu: &Emulator,
    token: &str,
    body: &Value,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(format!("{}/v1/events/ingest", emu.base))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
}

async fn ingest(emu: &Emulator, token: &str, body: &Value) -> reqwest::Response {
    send_ingest(&http(), emu, token, body).await.unwrap()
}

async fn list(emu: &Emulator, token: &str, query: &str) -> (u16, Value) {
    let r = http()
        .get(format!("{}/v1/events/?{query}", emu.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Writes `head` as-is and reads until the server closes: the framing cases
/// reqwest would repair for us.
async fn raw(emu: &Emulator, head: String) -> String {
    let addr = emu.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn tokens_are_checked_for_shape_and_scope() {
    let emu = Emulator::start_with_tokens(
        "polar_oat_full,polar_oat_reader=events:read+customers:read",
        &[],
    )
    .await;
    let url = format!("{}/v1/events/ingest", emu.base);

    let r = http().post(&url).json(&events(0..1)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "www-authenticate"), "Bearer realm=\"polar\"");
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"error": "Unauthorized", "detail": "Unauthorized"})
    );

    let r = http()
        .post(&url)
        .header("authorization", "Basic polar_oat_full")
        .json(&events(0..1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let r = ingest(&emu, "polar_oat_unknown", &events(0..1)).await;
    assert_eq!(r.status(), 401);
    assert!(header(&r, "www-authenticate").contains("error=\"invalid_token\""));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_token");

    let r = ingest(&emu, "polar_oat_reader", &events(0..1)).await;
    assert_eq!(r.status(), 403);
    assert!(header(&r, "www-authenticate").contains("scope=\"events:write\""));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "insufficient_scope");
    let r = http()
        .post(format!("{}/v1/customers/", emu.base))
        .bearer_auth("polar_oat_reader")
        .json(&json!({"type": "team", "external_id": "org-1", "name": "Org"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // What the reader may do, it may.
    assert_eq!(list(&emu, "polar_oat_reader", "").await.0, 200);
    let r = http()
        .get(format!("{}/v1/customers/external/org-1", emu.base))
        .bearer_auth("polar_oat_reader")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let r = ingest(&emu, "polar_oat_full", &events(0..1)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(emu.events().await["events"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn versions_and_trailing_slashes_behave_as_polar() {
    let emu = Emulator::start(&[]).await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |version: Option<&'static str>| {
        let mut r = no_redirects
            .get(format!("{}/v1/events/", emu.base))
            .bearer_auth(&emu.token);
        if let Some(v) = version {
            r = r.header("Polar-Version", v);
        }
        r.send()
    };
    let r = get(None).await.unwrap();
    assert_eq!(
        (r.status().as_u16(), header(&r, "polar-version")),
        (200, "2026-04".into())
    );
    let r = get(Some("2026-10")).await.unwrap();
    assert_eq!(
        (r.status().as_u16(), header(&r, "polar-version")),
        (200, "2026-10".into())
    );
    let r = get(Some("2025-01")).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"detail": "Not Found"})
    );

    for (path, to) in [
        ("/v1/events/ingest/", "/v1/events/ingest"),
        ("/v1/events", "/v1/events/"),
    ] {
        let r = no_redirects
            .post(format!("{}{path}", emu.base))
            .bearer_auth(&emu.token)
            .json(&events(0..1))
            .send()
            .await
            .unwrap();
        assert_eq!(
            (r.status().as_u16(), header(&r, "location")),
            (307, to.into()),
            "{path}"
        );
    }
    assert!(emu.events().await["events"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn bodies_need_a_length_and_stay_under_ten_mib() {
    let emu = Emulator::start(&[]).await;
    let head = |framing: &str| {
        format!(
            "POST /v1/events/ingest HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nConnection: close\r\n{framing}\r\n\r\n",
            emu.token
        )
    };
    let chunked = raw(
        &emu,
        format!("{}0\r\n\r\n", head("Transfer-Encoding: chunked")),
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 411"), "{chunked}");
    assert!(chunked.contains("LengthRequired"), "{chunked}");
    // Refused on the declared length alone, before a byte of body is sent.
    let huge = raw(
        &emu,
        head(&format!("Content-Length: {}", 10 * 1024 * 1024 + 1)),
    )
    .await;
    assert!(huge.starts_with("HTTP/1.1 413"), "{huge}");
    assert!(huge.contains("RequestBodyTooLarge"), "{huge}");
    assert!(emu.events().await["events"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn dedup_validation_and_listing() {
    let emu = Emulator::start_with_tokens("polar_oat_a,polar_oat_b", &[]).await;
    let counts = |v: Value| (v["inserted"].as_u64(), v["duplicates"].as_u64());
    let r = ingest(&emu, "polar_oat_a", &events(0..150)).await;
    assert_eq!(counts(r.json().await.unwrap()), (Some(150), Some(0)));
    let r = ingest(&emu, "polar_oat_a", &events(100..160)).await;
    assert_eq!(counts(r.json().await.unwrap()), (Some(10), Some(50)));
    // Dedup is per organization: another org's identical ids are new.
    let r = ingest(&emu, "polar_oat_b", &events(0..150)).await;
    assert_eq!(counts(r.json().await.unwrap()), (Some(150), Some(0)));

    // One bad event rejects the whole batch, and loc names it.
    let mut bad = events(200..203);
    bad["events"][1].as_object_mut().unwrap().remove("name");
    let r = ingest(&emu, "polar_oat_a", &bad).await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    let locs: Vec<&Value> = v["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["loc"])
        .collect();
    assert!(!locs.is_empty() && locs.iter().all(|l| l[2] == 1), "{v}");
    assert_eq!(
        list(&emu, "polar_oat_a", "limit=1").await.1["pagination"]["total_count"],
        160
    );

    // limit is clamped to 100, never refused; 0 is.
    let (s, v) = list(&emu, "polar_oat_a", "limit=500").await;
    assert_eq!(s, 200);
    assert_eq!(v["items"].as_array().unwrap().len(), 100);
    assert_eq!(v["pagination"], json!({"total_count": 160, "max_page": 2}));
    let (_, v) = list(&emu, "polar_oat_a", "limit=100&page=2").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 60);
    let (s, v) = list(&emu, "polar_oat_a", "limit=0").await;
    assert_eq!(s, 422);
    assert_eq!(v["detail"][0]["loc"], json!(["query", "limit"]));
    let (_, v) = list(&emu, "polar_oat_a", "metadata%5Bkind%5D=x&limit=1").await;
    assert_eq!(
        v["pagination"]["total_count"],
        (0..160).filter(|i| i % 3 == 0).count()
    );
}

#[tokio::test]
async fn events_show_in_the_list_only_after_the_visibility_delay() {
    // Long enough that a loaded machine cannot reach the first list late.
    let emu = Emulator::start(&["--visibility-delay-ms", "5000"]).await;
    let r = ingest(&emu, &emu.token, &events(0..3)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        list(&emu, &emu.token, "").await.1["pagination"]["total_count"],
        0
    );
    eventually(30, "events listed", || async {
        (list(&emu, &emu.token, "").await.1["pagination"]["total_count"] == 3).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_rate_limit_answers_an_empty_429_with_retry_after() {
    let emu = Emulator::start(&["--rate-limit", "3"]).await;
    for _ in 0..3 {
        assert_eq!(list(&emu, &emu.token, "").await.0, 200);
    }
    let r = ingest(&emu, &emu.token, &events(0..1)).await;
    assert_eq!(r.status(), 429);
    let wait: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert!(r.bytes().await.unwrap().is_empty());
    // Throttled requests store nothing, and admin calls are not limited.
    assert!(emu.events().await["events"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn each_injected_fault_does_what_it_says() {
    let emu = Emulator::start(&[]).await;
    let stored = || async { emu.events().await["events"].as_array().unwrap().len() };

    emu.faults(json!({"error_5xx": 1.0})).await;
    let r = ingest(&emu, &emu.token, &events(0..1)).await;
    assert!([500, 502].contains(&r.status().as_u16()), "{}", r.status());
    assert_eq!(stored().await, 0, "a 5xx stores nothing");

    emu.faults(json!({"rate_429": 1.0})).await;
    let r = ingest(&emu, &emu.token, &events(0..1)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), "1");
    assert_eq!(stored().await, 0);

    // Committed, then the connection closes without an answer.
    emu.faults(json!({"commit_then_drop": 1.0})).await;
    let sent = send_ingest(&http(), &emu, &emu.token, &events(0..2)).await;
    assert!(sent.is_err(), "no answer expected: {sent:?}");
    assert_eq!(stored().await, 2);
    let stats = emu.stats().await;
    assert_eq!(stats["unacknowledged_inserts"], 2, "{stats}");
    assert_eq!(
        stats["requests"]["POST /v1/events/ingest dropped"], 1,
        "{stats}"
    );

    // Processed, but answered later than the client waits.
    emu.faults(json!({"timeout": 1.0, "delay_ms": 3000})).await;
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(500))
        .build()
        .unwrap();
    let late = send_ingest(&impatient, &emu, &emu.token, &events(2..3)).await;
    assert!(late.is_err_and(|e| e.is_timeout()));
    assert_eq!(stored().await, 3);

    // Unknown fault names are refused rather than ignored.
    let r = http()
        .post(format!("{}/__admin/faults", emu.base))
        .json(&json!({"error_500": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Faults off: the resend of what was dropped is a duplicate.
    emu.faults(json!({})).await;
    let r = ingest(&emu, &emu.token, &events(0..3)).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["inserted"].as_u64(), v["duplicates"].as_u64()),
        (Some(0), Some(3))
    );
}
