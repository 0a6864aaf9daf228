use clap::Parser;
use polar_meterd::config::{Cli, Command, Config, LogFormat};
use polar_meterd::db::{Pools, Target};
use polar_meterd::jobs::Budget;
use polar_meterd::jobs::{self, Jobs, Settings};
use polar_meterd::metrics::Metrics;
use polar_meterd::polar::{Client, Health};
use polar_meterd::routes::{App, Limits, Surface};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;

// Many small short-lived allocations per request (JSON, headers, futures):
// glibc's malloc spent a quarter of the sidecar's CPU on them under load.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc (v3) by default commits its arenas eagerly and so keeps what a
/// burst touched: 16 clients sending 1000-event batches left the sidecar at
/// 77 MiB; committing on demand, at 32 MiB with the same throughput
/// (BENCHMARKS.md). mimalloc reads its options once, in its own constructor,
/// before main; this one runs earlier (a prioritised .init_array entry runs
/// before the plain ones) and only sets the default, so a
/// MIMALLOC_ARENA_EAGER_COMMIT in the environment still wins.
#[used]
#[link_section = ".init_array.00200"]
static ALLOCATOR_DEFAULTS: extern "C" fn() = {
    extern "C" fn commit_on_demand() {
        // mi_option_arena_eager_commit, in mimalloc.h (v3).
        unsafe { libmimalloc_sys::mi_option_set_default(MI_ARENA_EAGER_COMMIT, 0) }
    }
    commit_on_demand
};
const MI_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// The daemon logs to stdout; one-shot commands log to stderr, so that their
/// stdout is only their result.
fn init_tracing(format: LogFormat, to_stderr: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match (format, to_stderr) {
        (LogFormat::Json, false) => fmt.json().flatten_event(true).init(),
        (LogFormat::Json, true) => fmt
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .init(),
        (LogFormat::Pretty, false) => fmt.init(),
        (LogFormat::Pretty, true) => fmt.with_writer(std::io::stderr).init(),
    }
}

/// Everything the jobs share, from the configuration.
fn jobs(cfg: &Config, pools: &Pools, metrics: Arc<Metrics>) -> Result<Arc<Jobs>, String> {
    let polar = match cfg.polar_token()? {
        Some(token) => Some(Arc::new(Client::new(
            cfg.polar_base_url(),
            token,
            Duration::from_secs(cfg.polar_timeout_secs),
            metrics.clone(),
        )?)),
        None => None,
    };
    Ok(Arc::new(Jobs {
        pool: pools.background.clone(),
        target: pools.target.clone(),
        polar,
        budget: Budget::new(pools.background.clone(), cfg.polar_rate_limit()),
        health: Arc::new(Health::default()),
        metrics,
        webhook: RwLock::new(cfg.webhook_url()?),
        s: Settings {
            batch_size: cfg.batch_size.clamp(1, 10_000),
            lease: Duration::from_secs(cfg.lease_secs.max(cfg.polar_timeout_secs + 10)),
            poll: Duration::from_secs(cfg.poll_secs.max(1)),
            probe: Duration::from_secs(cfg.probe_secs.max(1)),
            stats: Duration::from_secs(cfg.stats_secs.max(1)),
        },
        wake: Default::default(),
    }))
}

fn pools(cfg: &Config, request_size: usize, background_size: usize) -> Result<Pools, String> {
    Pools::new(
        Target::parse(&cfg.database_url)?,
        request_size,
        background_size,
        Duration::from_millis(cfg.statement_timeout_ms.max(1)),
        Duration::from_secs(cfg.background_statement_timeout_secs.max(1)),
        Duration::from_millis(cfg.pool_wait_ms.max(1)),
        // 0: connections are kept for as long as they work.
        Some(Duration::from_secs(cfg.db_connection_max_age_secs)).filter(|d| !d.is_zero()),
    )
}

/// Progress of a long one-shot command, on stderr when it is a terminal.
struct Stderr;
impl polar_meterd::jobs::reconcile::Progress for Stderr {
    fn step(&self, what: &str) {
        eprint!("\r\x1b[2K{what}");
    }
}

async fn backfill(cfg: Config) -> Result<(), String> {
    let pools = pools(&cfg, 1, 2)?;
    let j = jobs(&cfg, &pools, Arc::default())?;
    if j.polar.is_none() {
        return Err("backfill needs POLAR_ACCESS_TOKEN".into());
    }
    let queued = polar_meterd::store::customers::backfill_polar_customers(&pools.background)
        .await
        .map_err(|e| e.to_string())?;
    let terminal = std::io::stderr().is_terminal();
    if terminal {
        eprint!("backfill: {queued} organizations queued; creating customers…");
    }
    let done = polar_meterd::jobs::provision::provision_due(&j)
        .await
        .map_err(|e| e.to_string())?;
    if terminal {
        eprintln!("\r\x1b[2Kbackfill: {done} of {queued} provisioned");
    }
    tracing::info!(queued, provisioned = done, "backfill finished");
    println!("backfill: {queued} organizations queued, {done} provisioned");
    if let Some((cause, _)) = j.health.paused() {
        return Err(format!("Polar is unavailable: {cause}"));
    }
    if (done as i64) < queued {
        return Err(format!(
            "{} organizations could not be provisioned yet (see the log; they are retried)",
            queued - done as i64
        ));
    }
    Ok(())
}

async fn reconcile(
    cfg: Config,
    window_end: Option<String>,
    hours: u32,
    full: bool,
) -> Result<(), String> {
    let pools = pools(&cfg, 1, 2)?;
    let j = jobs(&cfg, &pools, Arc::default())?;
    if j.polar.is_none() {
        return Err("reconcile needs POLAR_ACCESS_TOKEN".into());
    }
    let end = match window_end {
        None => None,
        Some(s) => Some(
            chrono::DateTime::parse_from_rfc3339(&s)
                .map_err(|e| format!("--window-end: {e}"))?
                .to_utc(),
        ),
    };
    let length = std::time::Duration::from_secs(u64::from(hours) * 3600);
    let mode = full.then_some("full");
    let run = polar_meterd::store::reconcile::reconcile_meter_to_polar(
        &pools.background,
        end,
        length,
        mode,
    )
    .await
    .map_err(|e| e.to_string())?;
    let terminal = std::io::stderr().is_terminal();
    let progress: &dyn polar_meterd::jobs::reconcile::Progress = if terminal {
        &Stderr
    } else {
        &polar_meterd::jobs::reconcile::NoProgress
    };
    let result = polar_meterd::jobs::reconcile::reconcile_next(&j, Some(run), progress).await;
    if terminal {
        eprintln!();
    }
    let result = result
        .map_err(|e| e.to_string())?
        .ok_or_else(|| match j.health.paused() {
            Some((cause, _)) => format!("Polar is unavailable: {cause}"),
            None => "the run was taken by another process".into(),
        })?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({"run_id": run, "result": result}))
            .unwrap()
    );
    Ok(())
}

async fn serve(cfg: Config) -> Result<(), String> {
    cfg.check()?;
    let metrics = Arc::new(Metrics::default());
    let pools = pools(&cfg, cfg.db_pool_size, cfg.worker_pool_size.max(2))?;
    let j = jobs(&cfg, &pools, metrics.clone())?;
    if j.polar.is_none() {
        tracing::warn!(
            "POLAR_ACCESS_TOKEN is not set: events are recorded but not delivered to Polar"
        );
    }
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => Some(polar_meterd::http::tls::Reloadable::new(
            c.clone(),
            k.clone(),
        )?),
        _ => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = jobs::spawn(j.clone(), stop_rx);
    let batch_concurrency = cfg.batch_concurrency.max(1);
    let bodies = polar_meterd::http::budget::Budget::new(polar_meterd::http::budget::BodyLimits {
        global_bytes: cfg.body_budget_bytes,
        connection_bytes: cfg.connection_body_budget_bytes,
        client_bytes: cfg.client_body_budget_bytes,
        wait: Duration::from_millis(cfg.pool_wait_ms.max(1)),
    });
    let admission_ttl = Duration::from_secs(cfg.admission_ttl_secs);
    let app = Arc::new(App {
        pools: pools.clone(),
        admission: polar_meterd::admission::Admission::new(
            pools.requests.clone(),
            admission_ttl,
            admission_ttl,
        ),
        bodies: bodies.clone(),
        metrics: metrics.clone(),
        recorder: polar_meterd::recorder::Recorder::new(
            pools.requests.clone(),
            cfg.group_commit_concurrency,
            cfg.max_pending_events,
            metrics,
        ),
        health: j.polar.as_ref().map(|_| j.health.clone()),
        batch_slots: tokio::sync::Semaphore::new(batch_concurrency),
        limits: Limits {
            max_body_bytes: cfg.max_body_bytes,
            batch_max_body_bytes: cfg.batch_max_body_bytes,
            body_timeout: cfg.body_timeout(),
            batch_concurrency,
            batch_wait: Duration::from_millis(cfg.pool_wait_ms.max(1)),
        },
    });
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("listen on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|e| format!("listen on {} (admin): {e}", cfg.admin_listen))?;
    let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(
        addr = %addr,
        admin_addr = %admin_addr,
        scheme = if tls.is_some() { "https" } else { "http" },
        version = polar_meterd::VERSION,
        polar_api_url = %polar_meterd::polar::redact(&cfg.polar_base_url()),
        polar_token_set = j.polar.is_some(),
        alert_webhook_set = j.webhook.read().unwrap().is_some(),
        database_tls = ?pools.target.ssl.mode,
        db_pool_size = cfg.db_pool_size,
        "listening"
    );
    tokio::spawn(reload_on_sighup(cfg.clone(), j.clone(), tls.clone()));
    let limits = polar_meterd::http::Limits {
        header_timeout: cfg.header_timeout(),
        idle_timeout: cfg.idle_timeout(),
        max_connections: cfg.max_connections,
        max_h2_streams: cfg.max_h2_streams,
        clients: polar_meterd::http::clients::Clients::new(
            cfg.max_connections_per_client,
            cfg.trusted_proxies.clone(),
        ),
        bodies,
    };
    // The admin listener: a few connections, and its own budget, so that no
    // load on the API can blind the operators' view of it.
    let admin_limits = polar_meterd::http::Limits {
        max_connections: 64,
        clients: polar_meterd::http::clients::Clients::new(64, vec![]),
        bodies: polar_meterd::http::budget::Budget::new(polar_meterd::http::budget::BodyLimits {
            global_bytes: 64 * 1024,
            connection_bytes: 64 * 1024,
            client_bytes: 64 * 1024,
            wait: Duration::from_millis(1),
        }),
        ..limits.clone()
    };
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::watch::channel(false);
    let admin = tokio::spawn(polar_meterd::http::serve(
        admin_listener,
        app.clone(),
        Surface::Admin,
        None,
        admin_limits,
        async move {
            let mut rx = admin_stop_rx;
            let _ = rx.wait_for(|s| *s).await;
        },
        Duration::from_secs(1),
    ));
    polar_meterd::http::serve(
        listener,
        app,
        Surface::Api,
        tls,
        limits,
        shutdown_signal(),
        Duration::from_secs(cfg.shutdown_grace_secs),
    )
    .await;
    let _ = admin_stop_tx.send(true);
    let _ = admin.await;
    // Jobs finish the call in hand; rows of an unfinished batch are released by their lease.
    let _ = stop_tx.send(true);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(cfg.polar_timeout_secs + 5), w).await;
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
    }
}

/// SIGHUP: the TLS certificate, the Polar token and the webhook URL are read
/// again (the last two from their _FILE variables; values given directly in
/// the environment cannot change). A value that fails to load keeps the old one.
async fn reload_on_sighup(
    cfg: Config,
    j: Arc<Jobs>,
    tls: Option<Arc<polar_meterd::http::tls::Reloadable>>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        if let Some(t) = &tls {
            match t.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate not reloaded; the old one stays")
                }
            }
        }
        match (cfg.polar_token(), &j.polar) {
            (Ok(Some(token)), Some(p)) => {
                p.set_token(token);
                tracing::info!("Polar token reloaded");
                j.wake.probe.notify_one();
            }
            (Err(e), _) => tracing::error!(error = %e, "Polar token not reloaded"),
            _ => {}
        }
        match cfg.webhook_url() {
            Ok(url) => {
                *j.webhook.write().unwrap() = url;
                tracing::info!("alert webhook reloaded");
            }
            Err(e) => tracing::error!(error = %e, "alert webhook not reloaded"),
        }
    }
}

/// The health check: this host's /readyz over loopback. The certificate is not
/// checked (it names the public host, not 127.0.0.1); only the status matters.
async fn ready(cfg: &Config, url: Option<String>) -> Result<(), String> {
    let scheme = if cfg.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let url = url.unwrap_or_else(|| format!("{scheme}://127.0.0.1:{}/readyz", cfg.listen.port()));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .danger_accept_invalid_certs(true)
        .build()
        .map_err(|e| e.to_string())?;
    let r = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    match r.status().as_u16() {
        200 => Ok(()),
        s => Err(format!("{url} answered {s}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let one_shot = !matches!(cli.command, None | Some(Command::Serve));
    init_tracing(cli.config.log_format, one_shot);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(cli.config).await,
            Command::Backfill => backfill(cli.config).await,
            Command::Reconcile {
                window_end,
                window_hours,
                full,
            } => reconcile(cli.config, window_end, window_hours, full).await,
            Command::Ready { url } => ready(&cli.config, url).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "polar-meterd failed");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mimalloc_commits_on_demand_unless_told_otherwise() {
        let expected = match std::env::var("MIMALLOC_ARENA_EAGER_COMMIT") {
            Ok(v) => v.parse().unwrap(),
            Err(_) => 0,
        };
        let got = unsafe { libmimalloc_sys::mi_option_get(super::MI_ARENA_EAGER_COMMIT) };
        assert_eq!(got, expected);
    }
}
