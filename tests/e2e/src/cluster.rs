//! The test cluster: connections, and a database per test cloned from a
//! template that has the extension, so tests are independent of each other
//! and of their order. `make test` (scripts/test.sh) starts the cluster.
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

/// A connection as `user` to database `db` of the test cluster.
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

/// A connection to another cluster on this machine (benchmarks, the chaos suite's own).
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

    /// A fresh database and a DBA connection to it.
    pub async fn with_admin() -> (TestDb, Client) {
        let db = TestDb::new().await;
        let pg = db.admin().await;
        (db, pg)
    }

    /// Where most suites start: a fresh database with organization `acme`,
    /// a DBA connection to it, and a `fence:meter` key of acme's.
    pub async fn acme() -> (TestDb, Client, String) {
        let (db, pg) = TestDb::with_admin().await;
        db.org(&pg, "acme").await;
        let (_, key) = db.key(&pg, "acme", &["fence:meter"]).await;
        (db, pg, key)
    }

    /// A superuser connection (the DBA).
    pub async fn admin(&self) -> Client {
        connect(&self.name, "postgres").await
    }

    pub async fn client_as(&self, user: &str) -> Client {
        connect(&self.name, user).await
    }

    /// An organization Polar would accept (an email), through upsert_organization.
    pub async fn org(&self, c: &Client, id: &str) {
        c.execute(
            "SELECT meter.upsert_organization($1, $1, $1 || '@example.org')",
            &[&id],
        )
        .await
        .unwrap();
    }

    /// Sets a polar_meter tunable for this database (meter.set_setting).
    pub async fn set(&self, c: &Client, name: &str, value: &str) {
        c.execute("SELECT meter.set_setting($1, $2)", &[&name, &value])
            .await
            .unwrap_or_else(|e| panic!("set_setting({name}, {value}): {e:?}"));
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

/// A PostgreSQL cluster of its own that accepts only TLS connections
/// (`hostssl` in pg_hba.conf, no `host` line), serving the certificate given,
/// with database `meter_tls` and the extension. Stopped and removed on drop.
pub struct TlsCluster {
    pub port: u16,
    // Removed after drop() has stopped the server.
    dir: crate::certs::ScratchDir,
}

const BIN: &str = "/usr/lib/postgresql/15/bin";

fn as_postgres(args: &[&str]) {
    let out = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TlsCluster {
    pub async fn start(leaf: &crate::certs::Leaf) -> TlsCluster {
        let dir = crate::certs::scratch_dir("tls-pg");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data = dir.join("data");
        let d = dir.to_str().unwrap().to_string();
        std::process::Command::new("chown")
            .args(["-R", "postgres:postgres", &d])
            .status()
            .unwrap();
        as_postgres(&[
            &format!("{BIN}/initdb"),
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        crate::certs::write(&data, "server.crt", &leaf.cert_pem);
        crate::certs::write(&data, "server.key", &leaf.key_pem);
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        writeln!(
            conf,
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{d}'\nssl = on\n\
             ssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nfsync = off\nmax_connections = 50"
        )
        .unwrap();
        std::process::Command::new("chown")
            .args(["-R", "postgres:postgres", &d])
            .status()
            .unwrap();
        std::process::Command::new("chmod")
            .args(["600", data.join("server.key").to_str().unwrap()])
            .status()
            .unwrap();
        as_postgres(&[
            &format!("{BIN}/pg_ctl"),
            "-D",
            data.to_str().unwrap(),
            "-l",
            &format!("{d}/log"),
            "-w",
            "-t",
            "60",
            "start",
        ]);
        let c = TlsCluster { port, dir };
        let admin = c.socket("postgres").await;
        admin
            .batch_execute("CREATE DATABASE meter_tls")
            .await
            .unwrap();
        c.socket("meter_tls")
            .await
            .batch_execute("CREATE EXTENSION polar_meter")
            .await
            .unwrap();
        c
    }

    /// A superuser connection over the Unix socket (TCP takes TLS only).
    pub async fn socket(&self, db: &str) -> Client {
        let url = format!(
            "host={} port={} user=postgres dbname={db}",
            self.dir.display(),
            self.port
        );
        let (client, conn) = tokio_postgres::connect(&url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = std::process::Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &format!("{BIN}/pg_ctl"),
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}

/// The Polar customer id written back onto an organization, if any.
pub async fn customer_id(c: &Client, org: &str) -> Option<String> {
    c.query_one(
        "SELECT polar_customer_id FROM meter.organization WHERE id = $1",
        &[&org],
    )
    .await
    .unwrap()
    .get(0)
}

/// A database made from template0 with the extension created at `version`
/// (None: the default, i.e. current, version), and a DBA connection to it.
pub async fn database_at(version: Option<&str>) -> (String, Client) {
    let name = format!("up_{}", uuid::Uuid::new_v4().simple());
    connect("postgres", "postgres")
        .await
        .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE template0"))
        .await
        .unwrap();
    let c = connect(&name, "postgres").await;
    let create = match version {
        Some(v) => format!("CREATE EXTENSION polar_meter VERSION '{v}'"),
        None => "CREATE EXTENSION polar_meter".into(),
    };
    c.batch_execute(&create).await.unwrap();
    (name, c)
}
