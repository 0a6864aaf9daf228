//! Hostile clients against a real polar-meterd: every wait is bounded. Slow
//! headers are cut at the header timeout, idle connections at the idle
//! timeout, slow bodies at the body deadline; request SQL runs under a
//! statement timeout with a bounded wait for a connection (503 +
//! Retry-After); idle connections by the hundred do not lock out a client;
//! batches in progress and single events held for a group commit are bounded.
use pm_e2e::Value1;
use pm_e2e::{eventually, http, idem, now_rfc3339, Sidecar, TestDb};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn setup(env: &[(&str, &str)]) -> (TestDb, tokio_postgres::Client, String, Sidecar) {
    let (db, pg, key) = TestDb::acme().await;
    let side = Sidecar::start(&db, env).await;
    (db, pg, key, side)
}

fn addr(side: &Sidecar) -> String {
    side.base.trim_start_matches("http://").to_string()
}

/// Reads until the server closes; returns when, and what it sent.
async fn until_closed(s: &mut TcpStream, limit: Duration) -> (Duration, Vec<u8>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (start.elapsed(), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("still open after {limit:?}"),
        }
    }
}

/// A DBA's open transaction recording acme's idempotency key `held`: a
/// request for that key waits in the database until it ends.
async fn hold_key(db: &TestDb) -> tokio_postgres::Client {
    let blocker = db.admin().await;
    blocker
        .run("BEGIN; SELECT meter.record_event_for_org('acme', 'held', 'e', now());")
        .await;
    blocker
}

/// Until one of the sidecar's request sessions waits on a lock.
async fn until_a_request_waits_on_a_lock(db: &TestDb) {
    let watcher = db.admin().await;
    eventually(10, "a request waiting on the held key", || async {
        let n: i64 = watcher
            .value("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'polar-meterd requests' AND datname = current_database() AND wait_event_type = 'Lock'").await;
        (n > 0).then_some(())
    })
    .await;
}

/// A single-event request with API key `key` and Idempotency-Key `k`.
fn meter(side: &Sidecar, key: &str, k: &str) -> reqwest::RequestBuilder {
    http()
        .post(side.url("/api/v1/meter"))
        .bearer_auth(key)
        .header("Idempotency-Key", k)
        .json(&json!({"event_name": "e", "event_timestamp": now_rfc3339()}))
}

/// A 503 `overloaded` problem with Retry-After: a bound refused the request.
async fn assert_overloaded(r: reqwest::Response) {
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["type"], "https://polar-meter.dev/problems/overloaded",
        "{v}"
    );
}

/// An unlabelled figure of the sidecar's /metrics.
async fn metric(side: &Sidecar, name: &str) -> Option<u64> {
    let text = http()
        .get(side.admin_url("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_half_sent_header_is_cut_off_at_the_header_timeout() {
    let (_db, _pg, _key, side) = setup(&[
        ("POLAR_METER_HEADER_TIMEOUT_SECS", "2"),
        ("POLAR_METER_IDLE_TIMEOUT_SECS", "60"),
    ])
    .await;
    let mut s = TcpStream::connect(addr(&side)).await.unwrap();
    s.write_all(b"POST /api/v1/meter HTTP/1.1\r\nHost: x\r\nAuthor")
        .await
        .unwrap();
    let (after, _) = until_closed(&mut s, Duration::from_secs(15)).await;
    assert!(
        after >= Duration::from_millis(1500) && after < Duration::from_secs(5),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn an_idle_connection_is_closed_at_the_idle_timeout_not_the_header_timeout() {
    let (_db, _pg, key, side) = setup(&[
        ("POLAR_METER_HEADER_TIMEOUT_SECS", "1"),
        ("POLAR_METER_IDLE_TIMEOUT_SECS", "4"),
    ])
    .await;
    // A finished request, then silence on a keep-alive connection.
    let mut s = TcpStream::connect(addr(&side)).await.unwrap();
    let body = json!({"event_name": "e", "event_timestamp": now_rfc3339()}).to_string();
    let req = format!(
        "POST /api/v1/meter HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nIdempotency-Key: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        idem(),
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 202"));
    let (after, rest) = until_closed(&mut s, Duration::from_secs(15)).await;
    assert!(rest.is_empty());
    assert!(
        after >= Duration::from_secs(3) && after < Duration::from_secs(7),
        "idle for {after:?}"
    );
}

/// One address's idle sockets (its first 64 held, the rest closed at once:
/// POLAR_METER_MAX_CONNECTIONS_PER_CLIENT) do not stop another client.
#[tokio::test]
async fn five_hundred_idle_connections_do_not_stop_a_well_behaved_client() {
    let (_db, pg, key, side) = setup(&[("POLAR_METER_MAX_CONNECTIONS_PER_CLIENT", "64")]).await;
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(TcpStream::connect(addr(&side)).await.unwrap());
    }
    // And a few that send half a header and stall.
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr(&side)).await.unwrap();
        s.write_all(b"POST /api/v1/meter HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        idle.push(s);
    }
    assert_eq!(side.record_from("127.0.0.2", &key).await.0, 202);
    let n: i64 = pg.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(n, 1);
    drop(idle);
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_slot() {
    let (_db, _pg, key, side) = setup(&[
        ("POLAR_METER_MAX_CONNECTIONS", "3"),
        ("POLAR_METER_IDLE_TIMEOUT_SECS", "60"),
    ])
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(addr(&side)).await.unwrap());
    }
    let client = http();
    let mut send = {
        let (url, key) = (side.url("/api/v1/meter"), key.clone());
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(key)
                .header("Idempotency-Key", idem())
                .json(&json!({"event_name": "e", "event_timestamp": now_rfc3339()}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    // While the three slots are taken, the request is not served.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), &mut send)
            .await
            .is_err(),
        "served past the connection cap"
    );
    drop(held.pop());
    assert_eq!(send.await.unwrap(), 202, "served once a slot frees");
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_a_408() {
    let (_db, _pg, key, side) = setup(&[("POLAR_METER_BODY_TIMEOUT_SECS", "2")]).await;
    let mut s = TcpStream::connect(addr(&side)).await.unwrap();
    let req = format!(
        "POST /api/v1/meter HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nIdempotency-Key: k\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"event_na"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (after, got) = until_closed(&mut s, Duration::from_secs(15)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("problems/body-timeout"), "{text}");
    assert!(after < Duration::from_secs(8), "{after:?}");
}

#[tokio::test]
async fn request_sql_is_bounded_by_a_statement_timeout_and_a_pool_wait() {
    let (db, _pg, key, side) = setup(&[
        ("POLAR_METER_STATEMENT_TIMEOUT_MS", "500"),
        ("POLAR_METER_POOL_WAIT_MS", "300"),
        ("POLAR_METER_DB_POOL_SIZE", "1"),
    ])
    .await;
    // A request for the held key waits inside the database, until the
    // statement timeout ends it.
    let blocker = hold_key(&db).await;
    // A second key has a group commit of its own, so its request needs a
    // connection of its own too.
    let (_, key2) = db.key(&db.admin().await, "acme", &["fence:meter"]).await;
    let started = Instant::now();
    let (held, other) = tokio::join!(meter(&side, &key, "held").send(), async {
        // Only once the held request has the connection and waits on the lock.
        until_a_request_waits_on_a_lock(&db).await;
        meter(&side, &key2, &idem()).send().await
    });
    let held = held.unwrap();
    assert_eq!(held.status(), 503);
    assert!(held.headers().contains_key("retry-after"));
    let other = other.unwrap();
    assert_eq!(
        other.status(),
        503,
        "the only connection was busy past the pool wait"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    blocker.run("ROLLBACK").await;
    // Background work never shares that pool or its timeout; requests go on.
    assert_eq!(
        meter(&side, &key, &idem()).send().await.unwrap().status(),
        202
    );
}

#[tokio::test]
async fn background_sql_is_bounded_by_a_statement_timeout_of_its_own() {
    let (db, _pg, _key, side) = setup(&[
        ("POLAR_METER_BACKGROUND_STATEMENT_TIMEOUT_SECS", "1"),
        ("POLAR_METER_POLL_SECS", "1"),
    ])
    .await;
    // A DBA locks the alert table: the sidecar's alert forwarding waits on it,
    // is cancelled after a second, and tries again, instead of hanging.
    let blocker = db.admin().await;
    blocker
        .run("BEGIN; LOCK TABLE meter.alert IN ACCESS EXCLUSIVE MODE")
        .await;
    eventually(20, "a cancelled background statement, logged", || async {
        side.logs_text()
            .contains("canceling statement due to statement timeout")
            .then_some(())
    })
    .await;
    blocker.run("ROLLBACK").await;
    // Requests never waited on it.
    let r = http().get(side.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Batches in progress are bounded (POLAR_METER_BATCH_CONCURRENCY): a batch
/// past the bound waits without its body being read, up to the pool wait,
/// then gets a 503 and nothing of it is recorded; a slot comes back when its
/// batch ends.
#[tokio::test]
async fn batches_in_progress_are_bounded() {
    let (_db, pg, key, side) = setup(&[
        ("POLAR_METER_BATCH_CONCURRENCY", "1"),
        ("POLAR_METER_POOL_WAIT_MS", "300"),
    ])
    .await;
    let event = |k: &str| json!({"idempotency_key": k, "event_name": "e", "event_timestamp": now_rfc3339()});
    let held_body = json!({"events": [event("held")]}).to_string();
    // A client that sends its headers and half its body holds the only slot.
    let mut s = TcpStream::connect(addr(&side)).await.unwrap();
    let (first, rest) = held_body.split_at(held_body.len() / 2);
    let head = format!(
        "POST /api/v1/meter/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{first}",
        held_body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let c = http();
    eventually(5, "the slow batch holding the slot", || async {
        (metric(&side, "polar_meter_batches_in_progress").await? == 1).then_some(())
    })
    .await;
    let batch = |k: &'static str| {
        c.post(side.url("/api/v1/meter/batch"))
            .bearer_auth(&key)
            .json(&json!({"events": [event(k)]}))
            .send()
    };
    let started = Instant::now();
    assert_overloaded(batch("refused").await.unwrap()).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    // The slow client finishes; its batch is recorded and frees the slot.
    s.write_all(rest.as_bytes()).await.unwrap();
    let mut got = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut got))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&got[..n]);
    assert!(text.starts_with("HTTP/1.1 202"), "{text}");
    assert_eq!(batch("after").await.unwrap().status(), 202);
    let keys: Vec<String> = pg
        .column("SELECT idempotency_key FROM meter.meter_event ORDER BY idempotency_key")
        .await;
    assert_eq!(keys, ["after", "held"], "nothing of the refused batch");
}

#[tokio::test]
async fn single_events_held_for_their_group_commit_are_bounded() {
    let (db, pg, key, side) = setup(&[
        ("POLAR_METER_MAX_PENDING_EVENTS", "2"),
        ("POLAR_METER_GROUP_COMMIT_CONCURRENCY", "1"),
        // The held call waits on the lock for as long as the test needs.
        ("POLAR_METER_STATEMENT_TIMEOUT_MS", "60000"),
    ])
    .await;
    // The call carrying the held key waits in the database; the next event
    // waits in memory behind that call.
    let blocker = hold_key(&db).await;
    let post = |k: &'static str| meter(&side, &key, k).send();
    let pending = || metric(&side, "polar_meter_group_commit_pending_events");
    let (held, rider, refused) = tokio::join!(
        post("held"),
        async {
            until_a_request_waits_on_a_lock(&db).await;
            post("rider").await
        },
        async {
            eventually(
                10,
                "two events held: one in the call, one waiting",
                || async { (pending().await? == 2).then_some(()) },
            )
            .await;
            // Answered while the lock is still held: the bound refuses at once,
            // where an event let in would wait behind the held call.
            let refused = tokio::time::timeout(Duration::from_secs(10), post("refused")).await;
            blocker.run("ROLLBACK").await;
            refused
        }
    );
    assert_overloaded(
        refused
            .expect("answered while the held call still waits")
            .unwrap(),
    )
    .await;
    for r in [held, rider] {
        let v: serde_json::Value = r.unwrap().json().await.unwrap();
        assert_eq!(v["status"], "recorded", "{v}");
    }
    let keys: Vec<String> = pg
        .column("SELECT idempotency_key FROM meter.meter_event ORDER BY 1")
        .await;
    assert_eq!(
        keys,
        ["held", "rider"],
        "the refused event was not recorded"
    );
    // Once the held events are answered, the refused one goes through as it was.
    eventually(10, "nothing held", || async {
        (pending().await? == 0).then_some(())
    })
    .await;
    let v: serde_json::Value = post("refused").await.unwrap().json().await.unwrap();
    assert_eq!(v["status"], "recorded", "{v}");
}

/// A pooled connection is replaced once past its age
/// (POLAR_METER_DB_CONNECTION_MAX_AGE_SECS), so that the plans PostgreSQL
/// caches per connection are made again as the tables grow; requests never
/// notice.
#[tokio::test]
async fn pooled_connections_are_replaced_past_their_age() {
    let (db, pg, key, side) = setup(&[
        ("POLAR_METER_DB_POOL_SIZE", "1"),
        ("POLAR_METER_DB_CONNECTION_MAX_AGE_SECS", "1"),
    ])
    .await;
    let post = || meter(&side, &key, &idem()).send();
    let watcher = db.admin().await;
    let backend = || async {
        let pids: Vec<i32> = watcher
            .column(
                "SELECT pid FROM pg_stat_activity
                 WHERE application_name = 'polar-meterd requests' AND datname = current_database()",
            )
            .await;
        pids
    };
    assert_eq!(post().await.unwrap().status(), 202);
    let first = backend().await;
    assert_eq!(first.len(), 1, "one request connection: {first:?}");
    let mut sent = 1;
    eventually(10, "a new request connection", || {
        sent += 1;
        async {
            assert_eq!(post().await.unwrap().status(), 202);
            let now = backend().await;
            (now.len() == 1 && now != first).then_some(())
        }
    })
    .await;
    let n: i64 = pg.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(n, sent, "every request was recorded across the replacement");
}
