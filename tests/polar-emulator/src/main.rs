use clap::Parser;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use polar_emulator::api::{self, Outcome};
use polar_emulator::store::Store;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Offline Polar: events and customers, with Polar's rules and injectable faults.
#[derive(Parser, Debug)]
#[command(name = "polar-emulator", version)]
struct Args {
    /// Address to listen on (127.0.0.1:0 picks a free port; the log line says which).
    #[arg(long, env = "POLAR_EMULATOR_LISTEN", default_value = "127.0.0.1:8788")]
    listen: std::net::SocketAddr,
    /// Organization access tokens accepted, comma-separated; each is its own
    /// organization. `token=scope+scope` restricts one (default: every scope).
    #[arg(
        long,
        env = "POLAR_EMULATOR_TOKENS",
        default_value = "polar_oat_emulator_local_development_token_0000000"
    )]
    tokens: String,
    /// Requests per minute per organization (Polar: 500 production, 100 sandbox).
    #[arg(long, env = "POLAR_EMULATOR_RATE_LIMIT")]
    rate_limit: Option<usize>,
    /// Behave as the sandbox (100 requests/minute, X-Polar-Sandbox: 1).
    #[arg(long, env = "POLAR_EMULATOR_SANDBOX")]
    sandbox: bool,
    /// Milliseconds between ingest and an event showing in GET /v1/events/.
    #[arg(long, env = "POLAR_EMULATOR_VISIBILITY_DELAY_MS", default_value_t = 0)]
    visibility_delay_ms: u64,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_target(false)
        .init();
    let args = Args::parse();
    let tokens = polar_emulator::store::parse_tokens(&args.tokens);
    let rate = args
        .rate_limit
        .unwrap_or(if args.sandbox { 100 } else { 500 });
    let store = Arc::new(Mutex::new(Store::new(
        tokens,
        rate,
        Duration::from_millis(args.visibility_delay_ms),
        args.sandbox,
    )));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    tracing::info!(addr = %addr, rate_per_minute = rate, sandbox = args.sandbox, "listening");
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let store = store.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let store = store.clone();
                async move {
                    match api::handle(store, req).await {
                        Outcome::Respond(r) => Ok(r),
                        // An error from the service makes hyper close the
                        // connection without a response: "committed, then dropped".
                        Outcome::Drop => Err(std::io::Error::other("injected connection drop")),
                    }
                }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
