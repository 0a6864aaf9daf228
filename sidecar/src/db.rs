//! Connections to PostgreSQL: the two pools (HTTP requests under a short
//! statement timeout; background work, whose calls can be long, under a long one), the
//! LISTEN connection, TLS as libpq's sslmode means it, and how failures are
//! classified: a client mistake (a SQLSTATE), or the database being away.
use deadpool_postgres::{HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::config::SslMode;

pub use crate::db_tls::SslSettings;

/// Where and how to connect: tokio-postgres's config plus the TLS settings
/// its own parser does not know (verify-ca, verify-full, sslrootcert).
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
    pub ssl: SslSettings,
}

impl Target {
    pub fn parse(database_url: &str) -> Result<Self, String> {
        let (rest, ssl) = crate::db_tls::split_ssl_params(database_url)?;
        let mut config =
            tokio_postgres::Config::from_str(&rest).map_err(|e| format!("DATABASE_URL: {e}"))?;
        config.application_name("polar-meterd");
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(3));
        }
        // A peer that vanished without a FIN (a failover, a dropped NAT entry)
        // is noticed in about a minute, not after the kernel's two hours: the
        // LISTEN session otherwise waits on it silently.
        config.keepalives_idle(Duration::from_secs(30));
        config.ssl_mode(match ssl.mode {
            crate::db_tls::Mode::Disable => SslMode::Disable,
            crate::db_tls::Mode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(ssl.client_config()?);
        Ok(Target { config, tls, ssl })
    }

    /// The same target with `-c name=value` added to the session's options.
    pub fn with_setting(&self, name: &str, value: &str) -> Self {
        let mut t = self.clone();
        let opt = format!("-c {name}={value}");
        let all = match self.config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {opt}"),
            _ => opt,
        };
        t.config.options(&all);
        t
    }

    /// The same target under application_name `polar-meterd <role>`, so that
    /// pg_stat_activity tells the pools apart (the Citus suite finds the
    /// request pool's backends by it).
    pub fn named(&self, role: &str) -> Self {
        let mut t = self.clone();
        t.config.application_name(format!("polar-meterd {role}"));
        t
    }

    /// A pool of `size` connections: a caller waits at most `wait` for one,
    /// and a connection past its age (allowed_age; never without `max_age`)
    /// is replaced when next taken, so that plans follow the tables:
    /// PostgreSQL caches a generic plan per connection, and one made while
    /// meter_event was nearly empty (a fresh install) can read an
    /// organization's whole index range on every idempotency-key lookup once
    /// the table has grown, until autovacuum's ANALYZE replans it. Recording
    /// once fell from 9k to 500 events/s that way within a minute of a fresh
    /// install; it no longer looks new keys up, but replays and background
    /// jobs still plan on the same growing tables.
    pub fn pool(
        &self,
        size: usize,
        wait: Duration,
        max_age: Option<Duration>,
    ) -> Result<Pool, String> {
        let born = Instant::now();
        let mgr = Manager::from_config(
            self.config.clone(),
            self.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(mgr)
            .max_size(size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(wait))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .pre_recycle(deadpool_postgres::Hook::sync_fn(
                move |_, m| match max_age {
                    Some(max)
                        if m.age()
                            > allowed_age(m.created.saturating_duration_since(born), max) =>
                    {
                        Err(HookError::message("past its maximum age"))
                    }
                    _ => Ok(()),
                },
            ))
            .build()
            .map_err(|e| format!("database pool: {e}"))
    }

    /// A connection of its own (the LISTEN session), and the connection
    /// object the caller must drive (its notifications arrive through it).
    pub async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<
                tokio_postgres::Socket,
                <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
                    tokio_postgres::Socket,
                >>::Stream,
            >,
        ),
        tokio_postgres::Error,
    > {
        self.config.connect(self.tls.clone()).await
    }
}

/// How long a connection opened `opened` after its pool was made may serve:
/// as long as the pool had lived when it opened, from 5 s up to `max_age`.
/// Tables fill fastest, relative to their size, right after an install, so
/// early connections (and the plans they cache) are replaced soonest: each
/// generation plans for a table about twice the size of the last one's.
pub fn allowed_age(opened: Duration, max_age: Duration) -> Duration {
    const FIRST: Duration = Duration::from_secs(5);
    opened.clamp(FIRST.min(max_age), max_age)
}

/// The request pool (statement timeout, bounded wait) and the background pool.
#[derive(Clone)]
pub struct Pools {
    pub requests: Pool,
    pub background: Pool,
    pub target: Arc<Target>,
}

impl Pools {
    pub fn new(
        target: Target,
        request_size: usize,
        background_size: usize,
        statement_timeout: Duration,
        background_statement_timeout: Duration,
        pool_wait: Duration,
        max_age: Option<Duration>,
    ) -> Result<Self, String> {
        let requests = target
            .named("requests")
            .with_setting(
                "statement_timeout",
                &statement_timeout.as_millis().to_string(),
            )
            .pool(request_size, pool_wait, max_age)?;
        // Long calls live here (a 1M-event reconcile_finish takes seconds),
        // apart from requests, under a bound of their own.
        let background = target
            .named("background")
            .with_setting(
                "statement_timeout",
                &background_statement_timeout.as_millis().to_string(),
            )
            .pool(background_size, Duration::from_secs(30), max_age)?;
        Ok(Pools {
            requests,
            background,
            target: Arc::new(target),
        })
    }
}

#[derive(Debug)]
pub enum DbError {
    /// The database cannot serve now (down, restarting, out of connections,
    /// a statement timeout, a serialization failure): the client should retry.
    Unavailable(String),
    /// A statement failed with this SQLSTATE; the message is the extension's
    /// own, which never contains secrets.
    Sql { code: String, message: String },
    /// Our own mistake (an unexpected row count or type): a 500, logged.
    Internal(String),
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbError::Sql { code, message } => write!(f, "{code}: {message}"),
            DbError::Unavailable(m) => write!(f, "database unavailable: {m}"),
            DbError::Internal(m) => write!(f, "{m}"),
        }
    }
}

impl DbError {
    /// Logs an outage or our own mistake. A SQLSTATE is not logged here: an
    /// expected one is the client's, and Problem::from_sql logs the others.
    pub fn log(&self) {
        if !matches!(self, DbError::Sql { .. }) {
            // PostgreSQL's or the pool's message; neither carries secrets.
            tracing::warn!(error = %self, "database call failed");
        }
    }

    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            DbError::Sql { code, .. } => Some(code),
            DbError::Unavailable(_) | DbError::Internal(_) => None,
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        // Getting a connection failed: making one was refused (down, auth,
        // TLS, no such database) or the wait ran out. Either way the database
        // cannot serve this request: a 503, never the client's fault.
        match e {
            deadpool_postgres::PoolError::Backend(e) => {
                DbError::Unavailable(DbError::from(e).to_string())
            }
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
                // 57014: statement timeout; 53: out of resources;
                // 40001/40P01: retryable conflicts.
                if code.starts_with("08")
                    || code.starts_with("57P")
                    || code == "57014"
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_connections_are_replaced_soonest_and_none_lives_past_the_maximum() {
        let s = Duration::from_secs;
        let max = s(60);
        assert_eq!(allowed_age(s(0), max), s(5), "the first generation");
        assert_eq!(allowed_age(s(5), max), s(5));
        assert_eq!(
            allowed_age(s(12), max),
            s(12),
            "then twice as long each time"
        );
        assert_eq!(allowed_age(s(24), max), s(24));
        assert_eq!(allowed_age(s(3600), max), max);
        assert_eq!(allowed_age(s(0), s(2)), s(2), "a maximum under 5 s is kept");
    }
}
