//! The connection pool and how database failures are classified: a client
//! mistake (a SQLSTATE the extension raised), or the database being away.
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::str::FromStr;
use std::time::Duration;

pub fn pool(database_url: &str, size: usize) -> Result<Pool, String> {
    let mut pg =
        tokio_postgres::Config::from_str(database_url).map_err(|e| format!("DATABASE_URL: {e}"))?;
    pg.application_name("polar-meterd");
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(3));
    }
    let mgr = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| format!("database pool: {e}"))
}

#[derive(Debug)]
pub enum DbError {
    /// The database cannot serve now (down, restarting, out of connections,
    /// a serialization failure): the client should retry.
    Unavailable(String),
    /// A statement failed with this SQLSTATE; the message is the extension's
    /// own, which never contains secrets.
    Sql { code: String, message: String },
    /// Our own mistake (an unexpected row count or type): a 500, logged.
    Internal(String),
}

impl DbError {
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            DbError::Sql { code, .. } => Some(code),
            DbError::Unavailable(_) | DbError::Internal(_) => None,
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => DbError::Unavailable(other.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                // 08: connection exception; 57P0x: shutdown/crash/starting;
                // 53: out of resources; 40001/40P01: retryable conflicts.
                if code.starts_with("08")
                    || code.starts_with("57P")
                    || code.starts_with("53")
                    || code == "40001"
                    || code == "40P01"
                {
                    DbError::Unavailable(format!("{code}: {}", db.message()))
                } else {
                    DbError::Sql {
                        code: code.to_string(),
                        message: db.message().to_string(),
                    }
                }
            }
            // Closed connections and I/O failures: the database is away.
            None if e.is_closed()
                || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>()) =>
            {
                DbError::Unavailable(e.to_string())
            }
            None => DbError::Internal(e.to_string()),
        }
    }
}
