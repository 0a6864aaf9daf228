//! Harness for the end-to-end suites. `make test` starts a throwaway cluster
//! (scripts/cluster.sh) with a template database that has the extension
//! installed; every test gets its own database cloned from it, so tests are
//! independent of each other and of their order.
use std::sync::atomic::{AtomicU32, Ordering};
use tokio_postgres::{Client, NoTls};

pub mod pg {
    pub fn host() -> String {
        std::env::var("PM_PG_HOST").unwrap_or_else(|_| "127.0.0.1".into())
    }
    pub fn port() -> u16 {
        std::env::var("PM_PG_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(55432)
    }
    pub fn template() -> String {
        std::env::var("PM_PG_TEMPLATE").unwrap_or_else(|_| "pm_template".into())
    }
    /// The database where pg_cron lives (cron.database_name).
    pub fn cron_db() -> String {
        std::env::var("PM_PG_CRON_DB").unwrap_or_else(|_| "pm_cron".into())
    }
    pub fn url(db: &str, user: &str) -> String {
        format!("host={} port={} user={user} dbname={db}", host(), port())
    }
}

pub async fn connect(db: &str, user: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(&pg::url(db, user), NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connect to {db} as {user} ({}): {e}; run the suites through `make test`",
                pg::url(db, user)
            )
        });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A fresh database, cloned from the template, for one test.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub async fn new() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t_{}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            uuid::Uuid::new_v4().simple().to_string().get(..8).unwrap()
        );
        let admin = connect("postgres", "postgres").await;
        // Two clones of one template at the same instant can collide on the
        // template's lock; retry briefly rather than fail the test.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match admin
                .batch_execute(&format!(
                    "CREATE DATABASE {name} TEMPLATE {}",
                    pg::template()
                ))
                .await
            {
                Ok(()) => break,
                Err(e)
                    if std::time::Instant::now() < deadline
                        && e.to_string().contains("being accessed") =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                Err(e) => panic!("create test database: {e}"),
            }
        }
        TestDb { name }
    }

    /// A superuser connection (the DBA).
    pub async fn admin(&self) -> Client {
        connect(&self.name, "postgres").await
    }

    pub async fn client_as(&self, user: &str) -> Client {
        connect(&self.name, user).await
    }

    pub async fn org(&self, c: &Client, id: &str) {
        c.execute(
            "INSERT INTO meter.organization (id, name) VALUES ($1, $1)",
            &[&id],
        )
        .await
        .unwrap();
    }

    /// Creates a key; returns (id, plaintext key).
    pub async fn key(&self, c: &Client, org: &str, permissions: &[&str]) -> (uuid::Uuid, String) {
        let perms: Vec<String> = permissions.iter().map(|s| s.to_string()).collect();
        let row = c
            .query_one(
                "SELECT id, key FROM meter.create_api_key($1, 'test', $2)",
                &[&org, &perms],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }
}

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

/// Root of the repository (for scripts and built binaries).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// A built binary of this workspace (built by `make test` before the suites).
pub fn binary(name: &str) -> std::path::PathBuf {
    let p = target_dir().join("debug").join(name);
    assert!(
        p.exists(),
        "{} is not built; run the suites through `make test`",
        p.display()
    );
    p
}

/// A running `polar-meterd`, logged in as a fresh least-privilege role.
/// Its stdout (JSON logs) is kept so tests can inspect what it logged.
pub struct Sidecar {
    child: tokio::process::Child,
    pub base: String,
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Sidecar {
    pub async fn start(db: &TestDb, env: &[(&str, &str)]) -> Sidecar {
        Self::start_on(&db.name, pg::port(), env).await
    }

    pub async fn start_on(db: &str, port: u16, env: &[(&str, &str)]) -> Sidecar {
        let role = format!("meterd_{}", uuid::Uuid::new_v4().simple());
        let admin = connect_port(db, "postgres", port).await;
        admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN IN ROLE polar_meter_sidecar"
            ))
            .await
            .unwrap();
        let url = format!("postgres://{role}@{}:{port}/{db}", pg::host());
        let mut cmd = tokio::process::Command::new(binary("polar-meterd"));
        cmd.arg("serve")
            .env_clear()
            .env("DATABASE_URL", url)
            .env("POLAR_METER_LISTEN", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "debug,tokio_postgres=info,hyper=info,h2=info,reqwest=info,hyper_util=info,rustls=info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (child, addr, logs) = spawn_listening(cmd).await;
        Sidecar {
            child,
            base: format!("http://{addr}"),
            logs,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub fn logs_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.pid().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(40), self.child.wait())
            .await
            .expect("polar-meterd did not exit after SIGTERM")
            .unwrap()
    }
}

pub async fn connect_port(db: &str, user: &str, port: u16) -> Client {
    let url = format!("host={} port={port} user={user} dbname={db}", pg::host());
    let (client, conn) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// An HTTP client for the suites: no pooling surprises, generous timeout.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A fresh idempotency key.
pub fn idem() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Spawns a workspace binary with a JSON log on stdout and waits for its
/// "listening" line; returns the child, its address and its log lines.
async fn spawn_listening(
    mut cmd: tokio::process::Command,
) -> (
    tokio::process::Child,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn");
    let stdout = child.stdout.take().unwrap();
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    let sink = logs.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut tx = Some(tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["message"] == "listening" {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_string());
                    }
                }
            }
            sink.lock().unwrap().push(line);
        }
    });
    let addr = tokio::time::timeout(std::time::Duration::from_secs(30), rx)
        .await
        .expect("no 'listening' log line within 30s")
        .expect("exited before listening");
    (child, addr, logs)
}

/// A running polar-emulator with a token of its own.
pub struct Emulator {
    _child: tokio::process::Child,
    pub base: String,
    pub token: String,
}

impl Emulator {
    pub async fn start(args: &[&str]) -> Emulator {
        let token = format!("polar_oat_{}", uuid::Uuid::new_v4().simple());
        Self::start_with_tokens(&token, args).await
    }

    /// An emulator accepting `tokens` (its `--tokens` syntax); `token` is
    /// the first of them.
    pub async fn start_with_tokens(tokens: &str, args: &[&str]) -> Emulator {
        let first = tokens.split(',').next().unwrap_or_default();
        let token = first.split('=').next().unwrap_or_default().to_string();
        let mut cmd = tokio::process::Command::new(binary("polar-emulator"));
        cmd.args(["--listen", "127.0.0.1:0", "--tokens", tokens])
            .args(args)
            .env_clear();
        let (child, addr, _) = spawn_listening(cmd).await;
        Emulator {
            _child: child,
            base: format!("http://{addr}"),
            token,
        }
    }

    /// Environment for a sidecar that delivers here, quickly.
    pub fn sidecar_env(&self) -> Vec<(String, String)> {
        vec![
            ("POLAR_ACCESS_TOKEN".into(), self.token.clone()),
            ("POLAR_API_URL".into(), self.base.clone()),
            ("POLAR_METER_POLL_SECS".into(), "1".into()),
            ("POLAR_RATE_LIMIT".into(), "6000".into()),
        ]
    }

    pub async fn faults(&self, f: serde_json::Value) {
        let r = http()
            .post(format!("{}/__admin/faults", self.base))
            .json(&f)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// Every stored event, with the external_id Polar keeps but does not list.
    pub async fn events(&self) -> serde_json::Value {
        http()
            .get(format!("{}/__admin/events", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Answers by "METHOD path status" (or "dropped"), the faults in force,
    /// and `unacknowledged_inserts`.
    pub async fn stats(&self) -> serde_json::Value {
        http()
            .get(format!("{}/__admin/stats", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn customers(&self) -> Vec<serde_json::Value> {
        let v: serde_json::Value = http()
            .get(format!("{}/__admin/customers", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["customers"].as_array().unwrap().clone()
    }
}

impl Sidecar {
    pub async fn start_with(db: &TestDb, env: &[(String, String)]) -> Sidecar {
        let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Self::start(db, &refs).await
    }

    /// SIGKILL: no shutdown, no report of the batch in hand.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// A webhook receiver that keeps every JSON body POSTed to it.
pub struct Webhook {
    pub url: String,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Webhook {
    pub async fn start() -> Webhook {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/alerts", listener.local_addr().unwrap());
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = received.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let sink = sink.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let sink = sink.clone();
                            async move {
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                if let Ok(v) = serde_json::from_slice(&body) {
                                    sink.lock().unwrap().push(v);
                                }
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Webhook { url, received }
    }

    pub fn kinds(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|v| v["kind"].as_str().unwrap_or("").to_string())
            .collect()
    }
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

/// Runs a one-shot `polar-meterd` command (backfill, reconcile) logged in as a
/// fresh least-privilege role, talking to the emulator; returns its output.
pub async fn meterd_cli(db: &TestDb, emu: &Emulator, args: &[&str]) -> std::process::Output {
    let role = format!("cli_{}", uuid::Uuid::new_v4().simple());
    db.admin()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN IN ROLE polar_meter_sidecar"
        ))
        .await
        .unwrap();
    tokio::process::Command::new(binary("polar-meterd"))
        .args(args)
        .env_clear()
        .env(
            "DATABASE_URL",
            format!(
                "postgres://{role}@{}:{}/{}",
                pg::host(),
                pg::port(),
                db.name
            ),
        )
        .env("POLAR_ACCESS_TOKEN", &emu.token)
        .env("POLAR_API_URL", &emu.base)
        .env("POLAR_RATE_LIMIT", "6000")
        .output()
        .await
        .unwrap()
}
