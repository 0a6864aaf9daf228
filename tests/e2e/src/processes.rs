//! The processes the suites run for real: polar-meterd (logged in as a fresh
//! least-privilege role), the Polar emulator, a webhook receiver, and the
//! one-shot CLI.
use crate::assertions::http;
use crate::assertions::Fetch;
use crate::cluster::{connect_port, pg, TestDb};

/// Root of the repository (for scripts and built binaries).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn target_dir() -> std::path::PathBuf {
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
    /// The admin listener (/metrics, the detailed /readyz).
    pub admin: String,
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Sidecar {
    pub async fn start(db: &TestDb, env: &[(&str, &str)]) -> Sidecar {
        Self::start_on(&db.name, pg::port(), env).await
    }

    pub async fn start_on(db: &str, port: u16, env: &[(&str, &str)]) -> Sidecar {
        let role = sidecar_role(db, port).await;
        let url = format!("postgres://{role}@{}:{port}/{db}", pg::host());
        Self::start_url(&url, env).await
    }

    /// A sidecar with this DATABASE_URL (its role already made).
    pub async fn start_url(url: &str, env: &[(&str, &str)]) -> Sidecar {
        Self::start_binary(&binary("polar-meterd"), url, env).await
    }

    /// Another build of polar-meterd (an earlier release, for rolling upgrades).
    pub async fn start_binary(bin: &std::path::Path, url: &str, env: &[(&str, &str)]) -> Sidecar {
        let (child, listening, logs) = spawn_listening(sidecar_command(bin, url, env)).await;
        let scheme = if env.iter().any(|(k, _)| *k == "POLAR_METER_TLS_CERT") {
            "https"
        } else {
            "http"
        };
        let addr = listening["addr"].as_str().unwrap_or_default();
        let admin = listening["admin_addr"].as_str().unwrap_or_default();
        Sidecar {
            child,
            base: format!("{scheme}://{addr}"),
            admin: format!("http://{admin}"),
            logs,
        }
    }

    /// Runs polar-meterd serve expecting it to refuse to start; returns its
    /// exit status and everything it logged.
    pub async fn refused(url: &str, env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
        let mut cmd = sidecar_command(&binary("polar-meterd"), url, env);
        cmd.kill_on_drop(true);
        let out = tokio::time::timeout(std::time::Duration::from_secs(30), cmd.output())
            .await
            .expect("polar-meterd should have exited")
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    }

    pub async fn start_with(db: &TestDb, env: &[(String, String)]) -> Sidecar {
        let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Self::start(db, &refs).await
    }

    /// SIGKILL: no shutdown, no report of the batch in hand.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A path on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.admin)
    }

    /// POSTs one fresh event (`e`, now, a new Idempotency-Key); its status.
    pub async fn record(&self, key: &str) -> u16 {
        self.record_with(http(), key).await
    }

    /// The same from another loopback address (another client as far as
    /// per-client limits go): its status and how long it took.
    pub async fn record_from(&self, ip: &str, key: &str) -> (u16, std::time::Duration) {
        let started = std::time::Instant::now();
        let status = self.record_with(crate::http_from(ip), key).await;
        (status, started.elapsed())
    }

    async fn record_with(&self, client: reqwest::Client, key: &str) -> u16 {
        client
            .post(self.url("/api/v1/meter"))
            .bearer_auth(key)
            .header("Idempotency-Key", crate::idem())
            .json(&serde_json::json!({"event_name": "e", "event_timestamp": crate::now_rfc3339()}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
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

/// A fresh least-privilege login role for a sidecar in `db` (roles are
/// cluster-wide; a role per sidecar keeps tests independent).
pub async fn sidecar_role(db: &str, port: u16) -> String {
    let role = format!("meterd_{}", uuid::Uuid::new_v4().simple());
    connect_port(db, "postgres", port)
        .await
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN IN ROLE polar_meter_sidecar"
        ))
        .await
        .unwrap();
    role
}

fn sidecar_command(
    bin: &std::path::Path,
    url: &str,
    env: &[(&str, &str)],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("serve")
        .env_clear()
        .env("DATABASE_URL", url)
        .env("POLAR_METER_LISTEN", "127.0.0.1:0")
        .env("POLAR_METER_ADMIN_LISTEN", "127.0.0.1:0")
        // Every suite's clients share 127.0.0.1: the per-address limit is
        // attacked in hostile.rs and http_limits.rs, which set it themselves.
        .env("POLAR_METER_MAX_CONNECTIONS_PER_CLIENT", "10000")
        .env("POLAR_METER_STATS_SECS", "1")
        .env("POLAR_METER_PROBE_SECS", "1")
        .env("LOG_FORMAT", "json")
        .env(
            "RUST_LOG",
            "debug,tokio_postgres=info,hyper=info,h2=info,reqwest=info,hyper_util=info,rustls=info",
        );
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Spawns a workspace binary with a JSON log on stdout and waits for its
/// "listening" line; returns the child, that line and its log lines.
async fn spawn_listening(
    mut cmd: tokio::process::Command,
) -> (
    tokio::process::Child,
    serde_json::Value,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn");
    let stdout = child.stdout.take().unwrap();
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, rx) = tokio::sync::oneshot::channel::<serde_json::Value>();
    let sink = logs.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut tx = Some(tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["message"] == "listening" {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(v.clone());
                    }
                }
            }
            sink.lock().unwrap().push(line);
        }
    });
    let listening = tokio::time::timeout(std::time::Duration::from_secs(30), rx)
        .await
        .expect("no 'listening' log line within 30s")
        .expect("exited before listening");
    (child, listening, logs)
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
        let (child, listening, _) = spawn_listening(cmd).await;
        Emulator {
            _child: child,
            base: format!("http://{}", listening["addr"].as_str().unwrap_or_default()),
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
            .fetch_json()
            .await
    }

    /// Answers by "METHOD path status" (or "dropped"), the faults in force,
    /// and `unacknowledged_inserts`.
    pub async fn stats(&self) -> serde_json::Value {
        http()
            .get(format!("{}/__admin/stats", self.base))
            .fetch_json()
            .await
    }

    pub async fn customers(&self) -> Vec<serde_json::Value> {
        let v: serde_json::Value = http()
            .get(format!("{}/__admin/customers", self.base))
            .fetch_json()
            .await;
        v["customers"].as_array().unwrap().clone()
    }
}

/// A webhook receiver that keeps every JSON body POSTed to it.
pub struct Webhook {
    pub url: String,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Webhook {
    pub async fn start() -> Webhook {
        Self::failing_first(0).await
    }

    /// A webhook that answers 500 to its first `n` calls (and keeps nothing
    /// from them), then 200.
    pub async fn failing_first(n: usize) -> Webhook {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/alerts", listener.local_addr().unwrap());
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sink = received.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (sink, calls) = (sink.clone(), calls.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (sink, calls) = (sink.clone(), calls.clone());
                            async move {
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let mut resp = hyper::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::from_static(b"ok"),
                                ));
                                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                                    *resp.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                                } else if let Ok(v) = serde_json::from_slice(&body) {
                                    sink.lock().unwrap().push(v);
                                }
                                Ok::<_, std::convert::Infallible>(resp)
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

    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.received.lock().unwrap().clone()
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
