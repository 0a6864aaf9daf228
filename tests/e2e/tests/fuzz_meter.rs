//! Hostile input against the running POST /api/v1/meter and its batch
//! form: malformed and truncated JSON, deep nesting, huge strings, invalid
//! UTF-8, odd and injected headers, SQL-looking strings, numeric edge cases,
//! duplicate keys, replays and conflicting replays, timestamps of every
//! RFC 3339 shape (offsets -23:59..+23:59, years 0001-9999, leap seconds,
//! long fractions), and slow or vanishing clients. Pass: no 5xx and no
//! transport error, every answer is problem+json or a 202, and every
//! recorded event stands for exactly one stored row.
//! PM_FUZZ_REQUESTS (default 10000) and PM_FUZZ_SEED make runs longer or
//! reproducible (`make fuzz` runs 100000).
use futures_util::StreamExt;
use pm_e2e::Value1;
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

/// A JSON number literal (or something that looks like one): the fixed list,
/// exponents -400..400 on plain and fractional mantissas, thousand-digit
/// integers, `-0`, `1E+5`. PostgreSQL's numeric prints some of these in
/// thousands of characters; each must be a 400 naming the field, or stored.
fn number(r: &mut Rng) -> String {
    match r.below(5) {
        0 | 1 => r.pick(NUMBERS).to_string(),
        2 => {
            let exp = r.below(801) as i64 - 400;
            let mantissa = ["1", "-1", "9.99", "0.5", "-0", "123456789"][r.below(6) as usize];
            let e = ["e", "E", "e+", "E-"][r.below(4) as usize];
            if e.ends_with('-') {
                format!("{mantissa}{e}{}", exp.abs())
            } else {
                format!("{mantissa}{e}{exp}")
            }
        }
        3 => {
            let digits = 1 + r.below(1000) as usize;
            let mut s: String = (0..digits)
                .map(|_| char::from(b'0' + r.below(10) as u8))
                .collect();
            if r.below(2) == 0 {
                s.insert(0, '-');
            }
            if s.trim_start_matches('-').starts_with('0') && s.trim_start_matches('-').len() > 1 {
                s = s.replacen('0', "1", 1);
            }
            s
        }
        _ => ["-0", "1E+5", "1e-16383", "1e64", "1e63", "-0.000"][r.below(6) as usize].to_string(),
    }
}

/// Any RFC 3339 shape: years 0001-9999, leap seconds, 0 to 12 fraction
/// digits, offsets from -23:59 to +23:59 or Z; and a few that are not.
fn ts(r: &mut Rng) -> Value {
    if r.below(8) == 0 {
        return json!(*r.pick(&[
            "2026-01-01T00:00:00",
            "2026-02-30T00:00:00Z",
            "99999-01-01T00:00:00Z",
            "yesterday",
            "",
            "2026-01-01T00:00:00+24:00"
        ]));
    }
    let year = match r.below(4) {
        0 => 1 + r.below(9999),
        _ => 1971 + r.below(60),
    };
    let second = if r.below(10) == 0 { 60 } else { r.below(60) };
    let digits = r.below(13) as usize;
    let fraction: String = if digits == 0 {
        String::new()
    } else {
        format!(
            ".{}",
            (0..digits)
                .map(|_| char::from(b'0' + r.below(10) as u8))
                .collect::<String>()
        )
    };
    let offset = match r.below(3) {
        0 => "Z".to_string(),
        _ => format!(
            "{}{:02}:{:02}",
            if r.below(2) == 0 { '+' } else { '-' },
            r.below(24),
            r.below(60)
        ),
    };
    json!(format!(
        "{year:04}-{:02}-{:02}T{:02}:{:02}:{second:02}{fraction}{offset}",
        1 + r.below(12),
        1 + r.below(28),
        r.below(24),
        r.below(60)
    ))
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
            number(r)
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

/// The sidecar's ERROR lines, to say why a 5xx happened.
fn errors(side: &Sidecar) -> String {
    let logs = side.logs_text();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(r#""level":"ERROR""#))
        .collect();
    lines.join("\n")
}

/// How many requests (PM_FUZZ_REQUESTS, 10,000) and the seed (PM_FUZZ_SEED,
/// else the clock: printed, so a failure can be replayed).
fn fuzz_run() -> (usize, u64) {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let seed = env("PM_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    });
    (env("PM_FUZZ_REQUESTS").unwrap_or(10_000) as usize, seed)
}

#[tokio::test]
async fn ten_thousand_hostile_requests_never_break_the_contract() {
    let (n, seed) = fuzz_run();
    println!("fuzz: {n} requests, PM_FUZZ_SEED={seed}");
    let (db, pg, key) = TestDb::acme().await;
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
            "a {status} for client input: {}\nthe sidecar's errors:\n{}",
            String::from_utf8_lossy(body),
            errors(&side)
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
    let rows: Vec<String> = pg.column("SELECT id::text FROM meter.meter_event").await;
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

fn batch_item(r: &mut Rng, i: usize, j: usize) -> Value {
    let key = if r.below(10) == 0 {
        format!("fb-{}", r.below((i * 50 + j) as u64 + 1))
    } else {
        format!("fb-{i}-{j}")
    };
    match r.below(12) {
        0 => json!(*r.pick(&[json!(null), json!(1), json!("s"), json!([])])),
        1 => {
            json!({"idempotency_key": key, "event_name": "e", "event_timestamp": ts(r), "extra": 1})
        }
        2 => {
            json!({"idempotency_key": r.pick(NASTY), "event_name": r.pick(NASTY), "event_timestamp": "2026-01-01T00:00:00Z"})
        }
        3 => {
            // A number as the client wrote it (a string where it is no JSON number).
            let lit = number(r);
            let n = serde_json::from_str::<Value>(&lit).unwrap_or(Value::String(lit));
            json!({"idempotency_key": key, "event_name": "e", "event_timestamp": ts(r), "metadata": {"n": n}})
        }
        4 => json!({"idempotency_key": key, "event_name": 7, "event_timestamp": false}),
        5 => json!({"idempotency_key": key, "event_name": "e", "event_timestamp": ts(r)}),
        _ => {
            json!({"idempotency_key": key, "event_name": "api.request", "event_timestamp": "2026-01-01T00:00:00Z", "metadata": {"n": r.below(3)}})
        }
    }
}

fn batch_body(r: &mut Rng, i: usize) -> Vec<u8> {
    match r.below(12) {
        0 => (0..r.below(200)).map(|_| r.next() as u8).collect(),
        1 => r.pick(&[&b"{\"events\": {}}"[..], b"{\"events\": []}", b"{\"evts\": []}", b"[]", b"{\"events\": [], \"x\": 1}", b"null"]).to_vec(),
        2 => serde_json::to_vec(&json!({"events": vec![json!({}); 1001]})).unwrap(),
        3 => format!("{{\"events\": [{{\"idempotency_key\": \"fb-{i}\", \"idempotency_key\": \"x\", \"event_name\": \"e\", \"event_timestamp\": \"2026-01-01T00:00:00Z\"}}]}}").into_bytes(),
        4 => {
            let s = serde_json::to_vec(&json!({"events": (0..10).map(|j| batch_item(r, i, j)).collect::<Vec<_>>()})).unwrap();
            s[..r.below(s.len() as u64) as usize].to_vec()
        }
        _ => {
            let n = 1 + r.below(50) as usize;
            serde_json::to_vec(&json!({"events": (0..n).map(|j| batch_item(r, i, j)).collect::<Vec<_>>()})).unwrap()
        }
    }
}

#[tokio::test]
async fn hostile_batches_never_break_the_contract() {
    let (n, seed) = fuzz_run();
    let n = n / 10;
    println!("fuzz (batch): {n} requests, PM_FUZZ_SEED={seed}");
    let (db, pg, key) = TestDb::acme().await;
    let side = Sidecar::start(&db, &[]).await;
    let url = side.url("/api/v1/meter/batch");
    let client = http();
    let mut rng = Rng(seed);
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| batch_body(&mut rng, i)).collect();
    let results: Vec<(u16, String, Vec<u8>, Option<usize>)> = futures_util::stream::iter(bodies)
        .map(|body| {
            let (client, url, key) = (client.clone(), url.clone(), key.clone());
            let items = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["events"].as_array().map(Vec::len));
            async move {
                match client
                    .post(&url)
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) => {
                        let ct = r
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let s = r.status().as_u16();
                        (s, ct, r.bytes().await.unwrap().to_vec(), items)
                    }
                    Err(e) => (0, e.to_string(), Vec::new(), items),
                }
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut recorded = HashSet::new();
    for (status, ct, body, items) in &results {
        assert!(*status != 0, "transport failure: {ct}");
        assert!(
            *status < 500,
            "a {status}: {}\nthe sidecar's errors:\n{}",
            String::from_utf8_lossy(body),
            errors(&side)
        );
        let v: Value = serde_json::from_slice(body).expect("JSON");
        if *status == 202 {
            let res = v["results"].as_array().expect("results");
            assert_eq!(Some(res.len()), *items, "a result per item, in order");
            for (i, r) in res.iter().enumerate() {
                match r["status"].as_str() {
                    Some("recorded") => {
                        assert!(recorded.insert(r["event_id"].as_str().unwrap().to_string()))
                    }
                    Some("already_recorded") => assert!(r["event_id"].is_string()),
                    Some("error") => {
                        assert_eq!(r["problem"]["index"], i, "{r}");
                        assert!(r["problem"]["type"]
                            .as_str()
                            .unwrap()
                            .starts_with("https://polar-meter.dev/problems/"));
                        assert!(
                            (400..500).contains(&r["problem"]["status"].as_u64().unwrap()),
                            "{r}\nthe sidecar's errors:\n{}",
                            errors(&side)
                        );
                    }
                    other => panic!("item status {other:?}"),
                }
            }
        } else {
            assert_eq!(ct, "application/problem+json", "{status}: {v}");
            assert!([400, 413, 415].contains(status), "unexpected {status}: {v}");
        }
    }
    let rows: HashSet<String> = pg
        .column::<String>("SELECT id::text FROM meter.meter_event")
        .await
        .into_iter()
        .collect();
    assert_eq!(
        rows, recorded,
        "every recorded item is exactly one stored row"
    );
    assert!(!side.logs_text().contains("panicked"), "no panic");
}

#[tokio::test]
async fn slow_partial_and_vanishing_clients_never_break_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (db, pg, key) = TestDb::acme().await;
    let side = Sidecar::start(&db, &[("POLAR_METER_BODY_TIMEOUT_SECS", "2")]).await;
    let addr = side.base.trim_start_matches("http://").to_string();
    let request = |idem: &str| {
        let body =
            json!({"event_name": "e", "event_timestamp": "2026-01-01T00:00:00Z"}).to_string();
        format!(
            "POST /api/v1/meter HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nIdempotency-Key: {idem}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (addr, req) = (addr.clone(), request(&format!("slow-{i}")));
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let bytes = req.as_bytes();
            match i % 4 {
                // A byte at a time, within the deadlines: served.
                0 => {
                    for b in bytes {
                        s.write_all(&[*b]).await.unwrap();
                        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
                    }
                }
                // Gone halfway through the body.
                1 => {
                    s.write_all(&bytes[..bytes.len() - 10]).await.unwrap();
                    return None;
                }
                // Gone halfway through the headers.
                2 => {
                    s.write_all(&bytes[..40]).await.unwrap();
                    return None;
                }
                // Stalls in the body: cut at the body deadline with a 408.
                _ => s.write_all(&bytes[..bytes.len() - 10]).await.unwrap(),
            }
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(20),
                s.read_to_end(&mut answer),
            )
            .await;
            Some((i % 4, String::from_utf8_lossy(&answer).into_owned()))
        }));
    }
    for t in tasks {
        if let Some((kind, answer)) = t.await.unwrap() {
            let want = if kind == 0 {
                "HTTP/1.1 202"
            } else {
                "HTTP/1.1 408"
            };
            assert!(answer.starts_with(want), "{kind}: {answer:?}");
        }
    }
    let n: i64 = pg.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(
        n, 10,
        "the ten complete requests, and nothing from those that left"
    );
    assert_eq!(
        http()
            .get(side.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
