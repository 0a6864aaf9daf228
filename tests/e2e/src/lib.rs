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
            .env("RUST_LOG", "debug,tokio_postgres=info,hyper=info,h2=info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn polar-meterd");
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
            .expect("polar-meterd did not report its address within 30s")
            .expect("polar-meterd exited before listening");
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
