//! Configuration: environment variables, each with a matching --flag. Every
//! wait has a bound here, with its default; `polar-meterd --help` lists them.
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "polar-meterd", version = crate::LONG_VERSION, about = "polar-meter sidecar: HTTP API and Polar caller")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Serve the HTTP API and deliver to Polar (the default).
    Serve,
    /// Queue every organization without a Polar customer, provision them all, and exit.
    Backfill,
    /// Reconcile one window against Polar now, print the result (JSON), and exit.
    Reconcile {
        /// End of the window (RFC 3339); default: now minus the reconcile_lag setting, on the hour.
        #[arg(long)]
        window_end: Option<String>,
        /// Length of the window in hours.
        #[arg(long, default_value_t = 24)]
        window_hours: u32,
        /// List every event of the window (default: compare counts, list only where they differ,
        /// unless a weekly full run is due).
        #[arg(long)]
        full: bool,
    },
    /// Exit 0 if this host's polar-meterd answers GET /readyz with 200, else 1: a
    /// container health check (the image has no curl).
    Ready {
        /// The URL to ask; default: /readyz on loopback at POLAR_METER_LISTEN's port.
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct Config {
    /// PostgreSQL connection string (URL or key=value), as a least-privilege role (member of
    /// polar_meter_sidecar). sslmode (disable, prefer, require, verify-ca, verify-full) and
    /// sslrootcert are honoured as libpq does. Never logged: it may hold a password.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Polar organization access token (polar_oat_...). Never logged.
    #[arg(long, env = "POLAR_ACCESS_TOKEN", hide_env_values = true)]
    pub polar_access_token: Option<String>,

    /// A file holding the Polar token instead (re-read on SIGHUP).
    #[arg(long, env = "POLAR_ACCESS_TOKEN_FILE")]
    pub polar_access_token_file: Option<std::path::PathBuf>,

    /// Polar API base URL; `sandbox` names https://sandbox-api.polar.sh. Must be https
    /// unless its host is loopback or --polar-allow-insecure-url is given.
    #[arg(long, env = "POLAR_API_URL", default_value = "https://api.polar.sh")]
    pub polar_api_url: String,

    /// Allow a plain-http POLAR_API_URL on a non-loopback host (an emulator in a private network).
    #[arg(long, env = "POLAR_ALLOW_INSECURE_URL", default_value_t = false, action = clap::ArgAction::Set)]
    pub polar_allow_insecure_url: bool,

    /// Address to listen on (127.0.0.1:0 picks a free port; the log says which).
    #[arg(
        long = "listen",
        env = "POLAR_METER_LISTEN",
        default_value = "127.0.0.1:8787"
    )]
    pub listen: SocketAddr,

    /// Address of the admin listener: /metrics, the detailed /readyz and /healthz, for
    /// operators and Prometheus (the API listener keeps /healthz and a bare /readyz).
    /// Loopback by default; plain HTTP, since no key crosses it.
    #[arg(
        long = "admin-listen",
        env = "POLAR_METER_ADMIN_LISTEN",
        default_value = "127.0.0.1:9787"
    )]
    pub admin_listen: SocketAddr,

    /// Serve HTTPS with this certificate chain (PEM); reloaded on SIGHUP.
    #[arg(long, env = "POLAR_METER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The private key (PEM) for POLAR_METER_TLS_CERT; reloaded on SIGHUP.
    #[arg(long, env = "POLAR_METER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// A TLS-terminating proxy sits in front: allow plain HTTP on a non-loopback address.
    /// Without it (and without POLAR_METER_TLS_CERT) only loopback addresses are served,
    /// because API keys travel in the Authorization header.
    #[arg(long, env = "POLAR_METER_BEHIND_TLS_PROXY", default_value_t = false, action = clap::ArgAction::Set)]
    pub behind_tls_proxy: bool,

    /// Optional URL that receives alerts as JSON POSTs. Never logged.
    #[arg(long, env = "ALERT_WEBHOOK_URL", hide_env_values = true)]
    pub alert_webhook_url: Option<String>,

    /// A file holding the webhook URL instead (re-read on SIGHUP).
    #[arg(long, env = "ALERT_WEBHOOK_URL_FILE")]
    pub alert_webhook_url_file: Option<std::path::PathBuf>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Database connections for HTTP requests.
    #[arg(long, env = "POLAR_METER_DB_POOL_SIZE", default_value_t = 32)]
    pub db_pool_size: usize,

    /// Database connections for delivery, provisioning, reconciliation and alerts (their
    /// calls can be long, so they never share the request pool or its statement timeout).
    #[arg(long, env = "POLAR_METER_WORKER_POOL_SIZE", default_value_t = 4)]
    pub worker_pool_size: usize,

    /// statement_timeout of request SQL, in milliseconds (past it: 503 + Retry-After).
    #[arg(long, env = "POLAR_METER_STATEMENT_TIMEOUT_MS", default_value_t = 5000)]
    pub statement_timeout_ms: u64,

    /// statement_timeout of background SQL (delivery reports, reconciliation), in seconds:
    /// long enough for a 1M-event reconcile_finish, short enough that a stuck lock ends.
    #[arg(
        long,
        env = "POLAR_METER_BACKGROUND_STATEMENT_TIMEOUT_SECS",
        default_value_t = 300
    )]
    pub background_statement_timeout_secs: u64,

    /// Longest wait for a free request connection, in milliseconds (past it: 503 + Retry-After).
    #[arg(long, env = "POLAR_METER_POOL_WAIT_MS", default_value_t = 2000)]
    pub pool_wait_ms: u64,

    /// Seconds a pooled database connection is used before it is replaced, so that
    /// the plans PostgreSQL caches per connection are made again as tables grow
    /// (sooner in a pool's first minute); 0 keeps connections for as long as they work.
    #[arg(
        long,
        env = "POLAR_METER_DB_CONNECTION_MAX_AGE_SECS",
        default_value_t = 60
    )]
    pub db_connection_max_age_secs: u64,

    /// Largest body of POST /api/v1/meter and the key endpoints, in bytes.
    #[arg(long, env = "POLAR_METER_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Largest body of POST /api/v1/meter/batch, in bytes.
    #[arg(long, env = "POLAR_METER_BATCH_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub batch_max_body_bytes: usize,

    /// Batch requests read, parsed and recorded at once; more wait (up to
    /// POLAR_METER_POOL_WAIT_MS, then 503) before their body is read. Bounds the
    /// memory batches take: each holds its body and parsed events, a few MiB at 1000.
    #[arg(long, env = "POLAR_METER_BATCH_CONCURRENCY", default_value_t = 4)]
    pub batch_concurrency: usize,

    /// Bytes of request bodies being read at once, all connections together; past it a
    /// request waits up to POLAR_METER_POOL_WAIT_MS, then gets 503 + Retry-After.
    #[arg(long, env = "POLAR_METER_BODY_BUDGET_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub body_budget_bytes: usize,

    /// Bytes of request bodies being read at once on one connection (all its HTTP/2
    /// streams; also its HTTP/2 flow-control window). At least the batch body limit.
    #[arg(long, env = "POLAR_METER_CONNECTION_BODY_BUDGET_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub connection_body_budget_bytes: usize,

    /// Bytes of request bodies being read at once for one client address, all its
    /// connections (a trusted proxy's connections count per connection only).
    #[arg(long, env = "POLAR_METER_CLIENT_BODY_BUDGET_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub client_body_budget_bytes: usize,

    /// Connections one client address may hold open; past it new ones are closed at once.
    /// For a trusted proxy's connections, requests in progress per forwarded client instead.
    #[arg(
        long,
        env = "POLAR_METER_MAX_CONNECTIONS_PER_CLIENT",
        default_value_t = 64
    )]
    pub max_connections_per_client: usize,

    /// Addresses of proxies whose X-Forwarded-For names the client (comma-separated IPs).
    /// From any other peer the header is ignored and the socket's address is the client.
    #[arg(long, env = "POLAR_METER_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<std::net::IpAddr>,

    /// Seconds a key's admission verdict (good, or refused) is remembered before a batch
    /// slot, a group-commit place or body budget is taken. The recording call checks the
    /// key again, so a revoked key fails at once all the same.
    #[arg(long, env = "POLAR_METER_ADMISSION_TTL_SECS", default_value_t = 10)]
    pub admission_ttl_secs: u64,

    /// Seconds a client has to send a request's headers, the first from accept (HTTP/1.1
    /// and HTTP/2; also the TLS handshake).
    #[arg(long, env = "POLAR_METER_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub header_timeout_secs: u64,

    /// Seconds a client has to send a request's body.
    #[arg(long, env = "POLAR_METER_BODY_TIMEOUT_SECS", default_value_t = 30)]
    pub body_timeout_secs: u64,

    /// Seconds an idle keep-alive connection stays open.
    #[arg(long, env = "POLAR_METER_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,

    /// Connections served at once; more wait in the listen backlog.
    #[arg(long, env = "POLAR_METER_MAX_CONNECTIONS", default_value_t = 2048)]
    pub max_connections: usize,

    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, env = "POLAR_METER_MAX_H2_STREAMS", default_value_t = 128)]
    pub max_h2_streams: u32,

    /// Single-event requests held in memory for their group commit, waiting or in a
    /// call; past it: 503.
    #[arg(long, env = "POLAR_METER_MAX_PENDING_EVENTS", default_value_t = 10_000)]
    pub max_pending_events: usize,

    /// Recording calls in flight per API key: requests arriving meanwhile are coalesced
    /// into the next call (group commit). Two measured best under load (BENCHMARKS.md):
    /// one call executes while the other waits for its commit to reach disk.
    #[arg(
        long,
        env = "POLAR_METER_GROUP_COMMIT_CONCURRENCY",
        default_value_t = 2
    )]
    pub group_commit_concurrency: usize,

    /// Seconds to wait for in-flight requests on SIGTERM/SIGINT.
    #[arg(long, env = "POLAR_METER_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Events per ingest call (the body is also kept under 10 MiB).
    #[arg(long, env = "POLAR_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: i32,

    /// Polar requests per minute for all sidecars of this database together (shared through
    /// PostgreSQL; Polar allows 500 in production, 100 in the sandbox). Default: 450, or 90
    /// for the sandbox.
    #[arg(long, env = "POLAR_RATE_LIMIT")]
    pub rate_limit: Option<u32>,

    /// Timeout of one Polar call, in seconds (kept below the lease).
    #[arg(long, env = "POLAR_TIMEOUT_SECS", default_value_t = 30)]
    pub polar_timeout_secs: u64,

    /// Seconds between outbox polls when no notification arrives.
    #[arg(long, env = "POLAR_METER_POLL_SECS", default_value_t = 5)]
    pub poll_secs: u64,

    /// Lease on claimed events, in seconds: a sidecar that dies releases them after this.
    #[arg(long, env = "POLAR_METER_LEASE_SECS", default_value_t = 120)]
    pub lease_secs: u64,

    /// Seconds between reads of the outbox statistics that /metrics shows.
    #[arg(long, env = "POLAR_METER_STATS_SECS", default_value_t = 10)]
    pub stats_secs: u64,

    /// Seconds between checks of an unavailable Polar (delivery resumes on the first success).
    #[arg(long, env = "POLAR_METER_PROBE_SECS", default_value_t = 15)]
    pub probe_secs: u64,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

impl Config {
    pub fn polar_rate_limit(&self) -> u32 {
        // A margin under Polar's documented limits: other clients of the
        // same Polar organization share its budget.
        self.rate_limit
            .unwrap_or(if self.polar_base_url().contains("sandbox") {
                90
            } else {
                450
            })
            .max(1)
    }

    pub fn polar_base_url(&self) -> String {
        match self.polar_api_url.as_str() {
            "sandbox" => "https://sandbox-api.polar.sh".into(),
            "production" => "https://api.polar.sh".into(),
            url => url.trim_end_matches('/').into(),
        }
    }

    /// The Polar token: from POLAR_ACCESS_TOKEN_FILE when set (read now), else the variable.
    pub fn polar_token(&self) -> Result<Option<String>, String> {
        read_secret(
            self.polar_access_token_file.as_deref(),
            &self.polar_access_token,
            "POLAR_ACCESS_TOKEN_FILE",
        )
    }

    pub fn webhook_url(&self) -> Result<Option<String>, String> {
        read_secret(
            self.alert_webhook_url_file.as_deref(),
            &self.alert_webhook_url,
            "ALERT_WEBHOOK_URL_FILE",
        )
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs.max(1))
    }
    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs(self.body_timeout_secs.max(1))
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }

    /// Refuses what would expose keys or tokens: plain HTTP on a network address without a
    /// TLS proxy in front, and a plain-http Polar URL on a network host.
    pub fn check(&self) -> Result<(), String> {
        if self.tls_cert.is_none() && !self.listen.ip().is_loopback() && !self.behind_tls_proxy {
            return Err(format!(
                "refusing to serve plain HTTP on {}: API keys would cross the network in clear. \
                 Set POLAR_METER_TLS_CERT and POLAR_METER_TLS_KEY, or POLAR_METER_BEHIND_TLS_PROXY=true \
                 when a TLS proxy terminates in front of polar-meterd",
                self.listen
            ));
        }
        let max_lease = polar_meter_rules::bounds::LEASE_SECS as u64;
        if self.lease_secs == 0 || self.lease_secs > max_lease {
            return Err(format!(
                "POLAR_METER_LEASE_SECS ({}) must be 1 to {max_lease}: the database refuses longer leases",
                self.lease_secs
            ));
        }
        let need = self.batch_max_body_bytes.max(self.max_body_bytes);
        if self.connection_body_budget_bytes < need
            || self.client_body_budget_bytes < self.connection_body_budget_bytes
            || self.body_budget_bytes < self.client_body_budget_bytes
        {
            return Err(format!(
                "body budgets must nest: the largest body limit ({need}) <= POLAR_METER_CONNECTION_BODY_BUDGET_BYTES ({}) \
                 <= POLAR_METER_CLIENT_BODY_BUDGET_BYTES ({}) <= POLAR_METER_BODY_BUDGET_BYTES ({})",
                self.connection_body_budget_bytes, self.client_body_budget_bytes, self.body_budget_bytes
            ));
        }
        crate::polar::check_base_url(&self.polar_base_url(), self.polar_allow_insecure_url)
    }
}

fn read_secret(
    file: Option<&std::path::Path>,
    value: &Option<String>,
    what: &str,
) -> Result<Option<String>, String> {
    match file {
        Some(path) => std::fs::read_to_string(path)
            .map(|s| Some(s.trim().to_string()).filter(|s| !s.is_empty()))
            .map_err(|e| format!("{what} ({}): {e}", path.display())),
        None => Ok(value.clone().filter(|s| !s.is_empty())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &[&str]) -> Config {
        let mut all = vec!["polar-meterd", "--database-url", "host=x"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().config
    }

    #[test]
    fn plain_http_is_refused_off_loopback_unless_a_proxy_terminates_tls() {
        assert!(cfg(&[]).check().is_ok());
        let err = cfg(&["--listen", "0.0.0.0:8787"]).check().unwrap_err();
        assert!(err.contains("POLAR_METER_BEHIND_TLS_PROXY"), "{err}");
        assert!(
            cfg(&["--listen", "0.0.0.0:8787", "--behind-tls-proxy", "true"])
                .check()
                .is_ok()
        );
        assert!(cfg(&[
            "--listen",
            "0.0.0.0:8787",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem"
        ])
        .check()
        .is_ok());
    }

    #[test]
    fn body_budgets_must_hold_the_largest_body() {
        assert!(cfg(&[]).check().is_ok());
        let err = cfg(&["--connection-body-budget-bytes", "1000"])
            .check()
            .unwrap_err();
        assert!(
            err.contains("POLAR_METER_CONNECTION_BODY_BUDGET_BYTES"),
            "{err}"
        );
        assert!(cfg(&["--body-budget-bytes", "1048576"]).check().is_err());
        let c = cfg(&["--trusted-proxies", "127.0.0.2,::1"]);
        assert_eq!(c.trusted_proxies.len(), 2);
    }

    #[test]
    fn polar_urls_and_rates() {
        let c = cfg(&["--polar-api-url", "sandbox"]);
        assert_eq!(c.polar_base_url(), "https://sandbox-api.polar.sh");
        assert_eq!(c.polar_rate_limit(), 90);
        assert_eq!(cfg(&[]).polar_rate_limit(), 450);
        assert!(cfg(&["--polar-api-url", "http://polar.internal:8788"])
            .check()
            .is_err());
        assert!(cfg(&[
            "--polar-api-url",
            "http://polar.internal:8788",
            "--polar-allow-insecure-url",
            "true"
        ])
        .check()
        .is_ok());
        assert!(cfg(&["--polar-api-url", "http://127.0.0.1:8788"])
            .check()
            .is_ok());
    }

    #[test]
    fn secrets_come_from_files_when_given() {
        let dir = std::env::temp_dir().join(format!("pm-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "polar_oat_from_file\n").unwrap();
        let c = cfg(&[
            "--polar-access-token",
            "polar_oat_env",
            "--polar-access-token-file",
            f.to_str().unwrap(),
        ]);
        assert_eq!(
            c.polar_token().unwrap().as_deref(),
            Some("polar_oat_from_file")
        );
        assert_eq!(cfg(&[]).polar_token().unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
