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
