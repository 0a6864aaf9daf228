use clap::Parser;
use polar_meterd::config::{Cli, Command, Config, LogFormat};
use polar_meterd::routes::App;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

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

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
    }
}

fn polar_client(cfg: &Config) -> Result<Option<Arc<polar_meterd::polar::Client>>, String> {
    let Some(token) = cfg.polar_access_token.clone() else {
        return Ok(None);
    };
    let client = polar_meterd::polar::Client::new(
        cfg.polar_base_url(),
        token,
        cfg.polar_rate_limit(),
        Duration::from_secs(cfg.polar_timeout_secs),
    )?;
    Ok(Some(Arc::new(client)))
}

fn worker_settings(cfg: &Config) -> polar_meterd::worker::Settings {
    polar_meterd::worker::Settings {
        database_url: cfg.database_url.clone(),
        batch_size: cfg.batch_size.clamp(1, 10_000),
        lease: Duration::from_secs(cfg.lease_secs.max(cfg.polar_timeout_secs + 10)),
        poll: Duration::from_secs(cfg.poll_secs.max(1)),
        alert_webhook_url: cfg.alert_webhook_url.clone(),
    }
}

async fn backfill(cfg: Config) -> Result<(), String> {
    let pool = polar_meterd::db::pool(&cfg.database_url, 2)?;
    let polar = polar_client(&cfg)?.ok_or("backfill needs POLAR_ACCESS_TOKEN")?;
    let c = pool.get().await.map_err(|e| e.to_string())?;
    let queued: i64 = c
        .query_one("SELECT meter.backfill_polar_customers()", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    drop(c);
    let w = polar_meterd::worker::Workers::new(pool.clone(), polar, worker_settings(&cfg));
    let done = w.provision_due().await?;
    tracing::info!(queued, provisioned = done, "backfill finished");
    println!("backfill: {queued} organizations queued, {done} provisioned");
    if (done as i64) < queued {
        return Err(format!(
            "{} organizations could not be provisioned yet (see the log; they are retried)",
            queued - done as i64
        ));
    }
    Ok(())
}

async fn reconcile(cfg: Config, window_end: Option<String>, hours: u32) -> Result<(), String> {
    let pool = polar_meterd::db::pool(&cfg.database_url, 2)?;
    let polar = polar_client(&cfg)?.ok_or("reconcile needs POLAR_ACCESS_TOKEN")?;
    let end = match window_end {
        None => None,
        Some(s) => Some(
            chrono::DateTime::parse_from_rfc3339(&s)
                .map_err(|e| format!("--window-end: {e}"))?
                .to_utc(),
        ),
    };
    let length = format!("{hours} hours");
    let c = pool.get().await.map_err(|e| e.to_string())?;
    let run: i64 = c
        .query_one(
            "SELECT meter.reconcile_meter_to_polar($1, $2::text::interval)",
            &[&end, &length],
        )
        .await
        .map_err(|e| format!("{:?}", polar_meterd::db::DbError::from(e)))?
        .get(0);
    drop(c);
    let w = polar_meterd::worker::Workers::new(pool, polar, worker_settings(&cfg));
    let result = w
        .reconcile_next(Some(run))
        .await?
        .ok_or("the run was taken by another process")?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({"run_id": run, "result": result}))
            .unwrap()
    );
    Ok(())
}

async fn serve(cfg: Config) -> Result<(), String> {
    let pool = polar_meterd::db::pool(&cfg.database_url, cfg.db_pool_size)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = match polar_client(&cfg)? {
        Some(polar) => {
            polar_meterd::worker::spawn(pool.clone(), polar, worker_settings(&cfg), stop_rx)
        }
        None => {
            tracing::warn!(
                "POLAR_ACCESS_TOKEN is not set: events are recorded but not delivered to Polar"
            );
            Vec::new()
        }
    };
    let app = Arc::new(App {
        pool,
        metrics: Default::default(),
        max_body_bytes: cfg.max_body_bytes,
    });
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("listen on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(
        addr = %addr,
        version = polar_meterd::VERSION,
        polar_api_url = %cfg.polar_base_url(),
        polar_token_set = cfg.polar_access_token.is_some(),
        alert_webhook_set = cfg.alert_webhook_url.is_some(),
        db_pool_size = cfg.db_pool_size,
        "listening"
    );
    polar_meterd::http::serve(
        listener,
        app,
        shutdown_signal(),
        Duration::from_secs(cfg.shutdown_grace_secs),
    )
    .await;
    // Workers finish the batch in hand; rows of an unfinished one are
    // released by their lease.
    let _ = stop_tx.send(true);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(cfg.polar_timeout_secs + 5), w).await;
    }
    Ok(())
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
            } => reconcile(cli.config, window_end, window_hours).await,
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
