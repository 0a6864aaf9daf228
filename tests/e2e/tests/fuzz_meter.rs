//! Hostile input against the running POST /api/v1/meter: malformed and
//! truncated JSON, deep nesting, huge strings, invalid UTF-8, odd and
//! injected headers, SQL-looking strings, numeric edge cases, duplicate keys,
//! replays and conflicting replays. Pass: no 5xx, every answer is
//! problem+json or a 202, and every 202 stands for exactly one stored row.
//! PM_FUZZ_REQUESTS (default 10000) and PM_FUZZ_SEED make runs longer or
//! reproducible (`make fuzz` runs 100000).
use futures_util::StreamExt;
use pm_e2e::{http, Sidecar, TestDb};
use serde_json::{json, Value};
use std::collections::HashSet;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

const NASTY: &[&str] = &[
    "'; DROP TABLE meter.meter_event; --",
    "$$; SELECT pg_sleep(10); $$",
    "\\x00\\\\",
    "Robert'); DELETE FROM meter.api_key;--",
    "%0d%0aSet-Cookie: x=1",
    "é😀\u{202e}\u{feff}",
    "\u{0}",
    "{\"nested\":\"json\"}",
    " ",
    "",
];

const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1e308",
    "-1e308",
    "1e309",
    "1e-400",
    "123456789012345678901234567890",
    "0.1",
    "-9223372036854775809",
    "18446744073709551616",
    "1E+2",
    "00",
    "NaN",
    "Infinity",
    "0x10",
    ".5",
    "1.",
    "+1",
];

fn ts(r: &mut Rng) -> Value {
    json!(*r.pick(&[
        "2026-01-01T00:00:00Z",
        "2026-01-01T00:00:00.123456789+05:30",
        "2026-01-01T00:00:00",
        "1969-12-31T23:59:59Z",
        "2999-01-01T00:00:00Z",
        "99999-01-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "yesterday",
        "",
    ]))
}

/// One request: (headers, body bytes, idempotency key).
fn request(r: &mut Rng, key: &str, i: usize) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
    let idem = format!("fz-{i}");
    let mut headers: Vec<(String, Vec<u8>)> = vec![
        ("authorization".into(), format!("Bearer {key}").into_bytes()),
        ("content-type".into(), b"application/json".to_vec()),
        ("idempotency-key".into(), idem.clone().into_bytes()),
    ];
    let valid = json!({"event_name": "api.request", "event_timestamp": "2026-01-01T00:00:00Z", "metadata": {"n": i}});
    let body: Vec<u8> = match r.below(16) {
        0..=3 => serde_json::to_vec(&valid).unwrap(),
        4 => {
            // Replay of a likely-recorded key, same or different payload.
            headers[2].1 = format!("fz-{}", r.below(i as u64 + 1)).into_bytes();
            let n = r.below(i as u64 + 1);
            serde_json::to_vec(&json!({"event_name": "api.request", "event_timestamp": "2026-01-01T00:00:00Z", "metadata": {"n": n}}))
                .unwrap()
        }
        5 => (0..r.below(300)).map(|_| r.next() as u8).collect(),
        6 => {
            let s = serde_json::to_vec(&valid).unwrap();
            s[..r.below(s.len() as u64) as usize].to_vec()
        }
        7 => {
            let depth = 1 + r.below(3000) as usize;
            let inner = if r.below(2) == 0 { format!("{}1{}", "[".repeat(depth), "]".repeat(depth)) } else {
                format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
            };
            format!("{{\"event_name\":\"e\",\"event_timestamp\":\"2026-01-01T00:00:00Z\",\"metadata\":{{\"d\":{inner}}}}}").into_bytes()
        }
        8 => {
            let n = *r.pick(&[0usize, 1, 128, 129, 500, 501, 5_000, 70_000]);
            let field = r.below(3);
            let big = "x".repeat(n);
            let v = match field {
                0 => json!({"event_name": big, "event_timestamp": "2026-01-01T00:00:00Z"}),
                1 => json!({"event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z", "metadata": {"s": big}}),
                _ => json!({"event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z", "metadata": {big: 1}}),
            };
            serde_json::to_vec(&v).unwrap()
        }
        9 => {
            let s = *r.pick(NASTY);
            let v = match r.below(3) {
                0 => json!({"event_name": s, "event_timestamp": "2026-01-01T00:00:00Z"}),
                1 => json!({"event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z", "metadata": {"k": s, s: 1}}),
                _ => {
                    headers[2].1 = s.as_bytes().to_vec();
                    valid.clone()
                }
            };
            serde_json::to_vec(&v).unwrap()
        }
        10 => format!(
            "{{\"event_name\":\"e\",\"event_timestamp\":\"2026-01-01T00:00:00Z\",\"metadata\":{{\"n\":{}}}}}",
            r.pick(NUMBERS)
        )
        .into_bytes(),
        11 => match r.below(3) {
            0 => br#"{"event_name":"a","event_name":"b","event_timestamp":"2026-01-01T00:00:00Z"}"#.to_vec(),
            1 => br#"{"event_name":"a","event_timestamp":"2026-01-01T00:00:00Z","metadata":{"k":1,"k":2}}"#.to_vec(),
            _ => br#"{"event_name":"a","event_timestamp":"2026-01-01T00:00:00Z","metadata":{"k":1},"metadata":{}}"#.to_vec(),
        },
        12 => serde_json::to_vec(&json!({"event_name": "e", "event_timestamp": ts(r), "metadata": {}})).unwrap(),
        13 => {
            let v = r.pick(&[json!(null), json!([]), json!("s"), json!(1), json!({"event_name": 1, "event_timestamp": 2}),
                json!({"event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z", "metadata": null}),
                json!({"event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z", "metadata": [1]}),
                json!({"event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z", "extra": true})]).clone();
            serde_json::to_vec(&v).unwrap()
        }
        14 => {
            // Header trouble, with an otherwise valid body.
            match r.below(7) {
                0 => headers.retain(|h| h.0 != "authorization"),
                1 => headers[0].1 = b"Bearer ak_\xff\xfe".to_vec(),
                2 => headers[0].1 = format!("Basic {key}").into_bytes(),
                3 => headers.retain(|h| h.0 != "idempotency-key"),
                4 => headers[2].1 = vec![b'k'; 256],
                5 => headers[2].1 = b"caf\xe9".to_vec(),
                _ => {
                    let types: [&[u8]; 4] = [b"text/plain", b"application/json; charset=latin1", b"application/jsonp", b"*/*"];
                    headers[1].1 = r.pick(&types).to_vec()
                }
            }
            serde_json::to_vec(&valid).unwrap()
        }
        _ => {
            let mut s = serde_json::to_vec(&valid).unwrap();
            let tails: [&[u8]; 4] = [b" trailing", b"}", b"\x00", b"\n{}"];
            let tail = r.pick::<&[u8]>(&tails);
            s.extend_from_slice(tail);
            s
        }
    };
    (headers, body)
}

#[tokio::test]
async fn ten_thousand_hostile_requests_never_break_the_contract() {
    let n: usize = std::env::var("PM_FUZZ_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let seed: u64 = std::env::var("PM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("fuzz: {n} requests, PM_FUZZ_SEED={seed}");
    let db = TestDb::new().await;
    let pg = db.admin().await;
    db.org(&pg, "acme").await;
    let (_, key) = db.key(&pg, "acme", &["fence:meter"]).await;
    let side = Sidecar::start(&db, &[]).await;
    let url = side.url("/api/v1/meter");
    let client = http();
    let mut rng = Rng(seed);
    let reqs: Vec<_> = (0..n).map(|i| request(&mut rng, &key, i)).collect();

    let results: Vec<(u16, String, Vec<u8>)> = futures_util::stream::iter(reqs)
        .map(|(headers, body)| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let mut req = client.post(&url).body(body);
                for (k, v) in headers {
                    if let Ok(v) = reqwest::header::HeaderValue::from_bytes(&v) {
                        req = req.header(k, v);
                    }
                }
                match req.send().await {
                    Ok(r) => {
                        let ct = r
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let s = r.status().as_u16();
                        (s, ct, r.bytes().await.unwrap().to_vec())
                    }
                    // Every request gets an answer, over-limit bodies too.
                    Err(e) => (0, e.to_string(), Vec::new()),
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;

    let mut recorded = HashSet::new();
    let mut replayed = HashSet::new();
    let mut by_status = std::collections::BTreeMap::new();
    for (status, ct, body) in &results {
        *by_status.entry(*status).or_insert(0) += 1;
        assert!(*status != 0, "transport failure: {ct}");
        assert!(
            *status < 500,
            "a {status} for client input: {}",
            String::from_utf8_lossy(body)
        );
        let v: Value = serde_json::from_slice(body)
            .unwrap_or_else(|_| panic!("not JSON ({status}): {:?}", String::from_utf8_lossy(body)));
        if *status == 202 {
            assert_eq!(ct, "application/json");
            let id = v["event_id"].as_str().unwrap().to_string();
            match v["status"].as_str() {
                Some("recorded") => assert!(recorded.insert(id), "one id recorded twice"),
                Some("already_recorded") => {
                    replayed.insert(id);
                }
                other => panic!("202 with status {other:?}"),
            }
        } else {
            assert_eq!(ct, "application/problem+json", "{status}: {v}");
            assert_eq!(v["status"], *status);
            assert!(
                v["type"]
                    .as_str()
                    .unwrap()
                    .starts_with("https://polar-meter.dev/problems/"),
                "{v}"
            );
            assert!(
                [400, 401, 403, 413, 415, 422].contains(status),
                "unexpected {status}: {v}"
            );
        }
    }
    println!("fuzz: answers by status {by_status:?}");
    let rows: Vec<String> = pg
        .query("SELECT id::text FROM meter.meter_event", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let rows: HashSet<String> = rows.into_iter().collect();
    assert_eq!(
        rows, recorded,
        "every 'recorded' 202 is exactly one stored row, and no row lacks one"
    );
    assert!(
        replayed.is_subset(&recorded),
        "replays point at recorded events"
    );
    assert!(
        recorded.len() > n / 5,
        "the generator produced valid events too ({})",
        recorded.len()
    );
    assert_eq!(
        http()
            .get(side.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "still up"
    );
    assert!(!side.logs_text().contains("panicked"), "no panic");
}
