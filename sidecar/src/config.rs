//! Configuration: environment variables, each with a matching --flag.
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;

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
        /// End of the window (RFC 3339); default: now minus polar_meter.reconcile_lag, on the hour.
        #[arg(long)]
        window_end: Option<String>,
        /// Length of the window in hours.
        #[arg(long, default_value_t = 24)]
        window_hours: u32,
    },
}

#[derive(Args, Debug, Clone)]
pub struct Config {
    /// PostgreSQL connection string, as a least-privilege role (member of
    /// polar_meter_sidecar). Never logged: it may hold a password.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Polar organization access token (polar_oat_...). Never logged.
    #[arg(long, env = "POLAR_ACCESS_TOKEN", hide_env_values = true)]
    pub polar_access_token: Option<String>,

    /// Polar API base URL; `sandbox` names https://sandbox-api.polar.sh.
    #[arg(long, env = "POLAR_API_URL", default_value = "https://api.polar.sh")]
    pub polar_api_url: String,

    /// Address to listen on (127.0.0.1:0 picks a free port; the log says which).
    #[arg(
        long = "listen",
        env = "POLAR_METER_LISTEN",
        default_value = "127.0.0.1:8787"
    )]
    pub listen: SocketAddr,

    /// Optional URL that receives alerts as JSON POSTs.
    #[arg(long, env = "ALERT_WEBHOOK_URL", hide_env_values = true)]
    pub alert_webhook_url: Option<String>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Database connections kept by the pool.
    #[arg(long, env = "POLAR_METER_DB_POOL_SIZE", default_value_t = 32)]
    pub db_pool_size: usize,

    /// Largest request body accepted, in bytes (enforced while reading).
    #[arg(long, env = "POLAR_METER_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Events per ingest call (the body is also kept under 10 MiB).
    #[arg(long, env = "POLAR_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: i32,

    /// Polar requests per minute, shared by every Polar call of this process
    /// (Polar allows 500 in production, 100 in the sandbox). Default: 450, or 90 for the sandbox.
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

    /// Seconds to wait for in-flight requests on SIGTERM/SIGINT.
    #[arg(long, env = "POLAR_METER_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
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
    }

    pub fn polar_base_url(&self) -> String {
        match self.polar_api_url.as_str() {
            "sandbox" => "https://sandbox-api.polar.sh".into(),
            "production" => "https://api.polar.sh".into(),
            url => url.trim_end_matches('/').into(),
        }
    }
}
