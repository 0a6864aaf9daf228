use clap::Parser;
use polar_meterd::config::{Cli, Command, Config, LogFormat};
use polar_meterd::routes::App;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match format {
        LogFormat::Json => fmt.json().flatten_event(true).init(),
        LogFormat::Pretty => fmt.init(),
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

async fn serve(cfg: Config) -> Result<(), String> {
    let pool = polar_meterd::db::pool(&cfg.database_url, cfg.db_pool_size)?;
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
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.config.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(cli.config).await,
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
