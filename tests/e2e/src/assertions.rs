//! What the suites assert with: SQLSTATEs, polling with a deadline (never a
//! sleep), HTTP helpers, and exactly-once at the emulator.
use crate::processes::{Emulator, Sidecar};
use tokio_postgres::Client;

/// The SQLSTATE of a failed statement, for assertions.
pub fn sqlstate<T: std::fmt::Debug>(r: Result<T, tokio_postgres::Error>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| format!("no sqlstate: {e}")),
    }
}

/// The SQLSTATE and message of a failed statement.
pub fn db_error<T: std::fmt::Debug>(r: Result<T, tokio_postgres::Error>) -> (String, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => match e.as_db_error() {
            Some(d) => (d.code().code().to_string(), d.message().to_string()),
            None => panic!("not a database error: {e}"),
        },
    }
}

/// Polls `f` until it returns Some, or panics after `secs`. Tests never sleep
/// to synchronise; they wait for a condition with a deadline.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An HTTP client for the suites: no pooling surprises, generous timeout.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The same, from another loopback address (127.0.0.2, ...): another client
/// as far as per-client limits go.
pub fn http_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// A process's resident memory, in MiB, as the kernel reports it.
pub fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/pid/status");
    kib / 1024
}

/// A fresh idempotency key.
pub fn idem() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Counts of meter_event rows by polar_status.
pub async fn statuses(c: &Client) -> std::collections::BTreeMap<String, i64> {
    c.query(
        "SELECT polar_status, count(*) FROM meter.meter_event GROUP BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// One recorded event, as sent: for comparing with what Polar holds.
#[derive(Clone, Debug)]
pub struct Sent {
    pub id: String,
    pub org: String,
    pub name: String,
    pub timestamp: String,
    pub metadata: serde_json::Value,
}

/// Records `n` events over HTTP, spread over `keys` (org, key), with
/// `concurrency` requests in flight. Every answer must be a 202.
pub async fn record_many(
    side: &Sidecar,
    keys: &[(String, String)],
    n: usize,
    concurrency: usize,
) -> Vec<Sent> {
    use futures_util::StreamExt;
    let client = http();
    let url = side.url("/api/v1/meter");
    let base = chrono::Utc::now() - chrono::Duration::seconds(5);
    futures_util::stream::iter(0..n)
        .map(|i| {
            let (org, key) = keys[i % keys.len()].clone();
            let (client, url) = (client.clone(), url.clone());
            async move {
                let ts = (base + chrono::Duration::microseconds(i as i64)).to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                let name = if i % 3 == 0 { "api.request" } else { "tokens.used" };
                let metadata = serde_json::json!({"i": i, "model": format!("m{}", i % 7), "ok": i % 2 == 0});
                let r = client
                    .post(&url)
                    .bearer_auth(&key)
                    .header("Idempotency-Key", format!("ev-{i}"))
                    .json(&serde_json::json!({"event_name": name, "event_timestamp": ts, "metadata": metadata}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
                let v: serde_json::Value = r.json().await.unwrap();
                Sent { id: v["event_id"].as_str().unwrap().to_string(), org, name: name.into(), timestamp: ts, metadata }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Asserts Polar (the emulator) holds exactly `sent`, each once, as sent.
pub async fn assert_polar_holds_exactly(emu: &Emulator, sent: &[Sent]) {
    let all = emu.events().await;
    let events = all["events"].as_array().unwrap();
    let mut by_id: std::collections::HashMap<String, &serde_json::Value> = Default::default();
    for e in events {
        let id = e["metadata"]["meter_event_id"]
            .as_str()
            .expect("meter_event_id in metadata")
            .to_string();
        assert!(
            by_id.insert(id.clone(), e).is_none(),
            "event {id} stored twice at Polar"
        );
    }
    let ext: std::collections::HashSet<&str> = events
        .iter()
        .map(|e| e["external_id"].as_str().unwrap())
        .collect();
    assert_eq!(ext.len(), events.len(), "external ids are unique");
    assert_eq!(
        events.len(),
        sent.len(),
        "Polar holds exactly the recorded events"
    );
    for s in sent {
        let e = by_id
            .get(&s.id)
            .unwrap_or_else(|| panic!("event {} missing at Polar", s.id));
        assert_eq!(e["external_customer_id"], s.org.as_str());
        assert_eq!(e["name"], s.name.as_str());
        let got = chrono::DateTime::parse_from_rfc3339(e["timestamp"].as_str().unwrap()).unwrap();
        let want = chrono::DateTime::parse_from_rfc3339(&s.timestamp).unwrap();
        assert_eq!(got, want, "timestamp of {}", s.id);
        let mut meta = e["metadata"].clone();
        meta.as_object_mut().unwrap().remove("meter_event_id");
        assert_eq!(meta, s.metadata, "metadata of {}", s.id);
    }
}

/// Sending a request and reading its answer in one step, for the many places
/// that only want the body.
#[allow(async_fn_in_trait)]
pub trait Fetch {
    /// The answer's JSON body (panics on a transport error or non-JSON).
    async fn fetch_json(self) -> serde_json::Value;
    /// The answer's text body.
    async fn fetch_text(self) -> String;
    /// The status and the JSON body.
    async fn fetch(self) -> (u16, serde_json::Value);
}

impl Fetch for reqwest::RequestBuilder {
    async fn fetch_json(self) -> serde_json::Value {
        self.send().await.unwrap().json().await.unwrap()
    }
    async fn fetch_text(self) -> String {
        self.send().await.unwrap().text().await.unwrap()
    }
    async fn fetch(self) -> (u16, serde_json::Value) {
        let r = self.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }
}

/// One value from a statement without parameters, for the many counts and
/// lookups the suites make.
#[allow(async_fn_in_trait)]
pub trait Value1 {
    async fn value<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> T;
    /// The first column of every row.
    async fn column<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> Vec<T>;
    /// Runs statements that must succeed.
    async fn run(&self, sql: &str);
}

impl Value1 for Client {
    async fn value<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> T {
        self.query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }
    async fn column<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> Vec<T> {
        let rows = self
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.iter().map(|r| r.get(0)).collect()
    }
    async fn run(&self, sql: &str) {
        self.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

/// Waits up to `secs` for reconcile run `id` to be done; its result.
pub async fn reconcile_done(pg: &Client, id: i64, secs: u64) -> serde_json::Value {
    eventually(secs, "the run done", || async {
        let r = pg
            .query_one(
                "SELECT status, result FROM meter.reconcile_run WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (r.get::<_, String>(0) == "done").then(|| r.get::<_, serde_json::Value>(1))
    })
    .await
}
