//! Routing: each request to its handler, by resource, and the one
//! response, metric and log line per request. Each handler makes at most one
//! SQL call (through crate::store; a batch that fails as a whole is retried
//! item by item); everything it cannot decide from HTTP alone is the
//! extension's to judge.
//!   meter    POST /api/v1/meter and /api/v1/meter/batch
//!   keys     /api/v1/api-keys
//!   ops      discovery, /healthz, /readyz, /metrics
//!   extract  what every handler reads from a request, and JSON answers
mod extract;
mod keys;
mod meter;
mod ops;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::Admission;
use crate::db::{DbError, Pools};
use crate::http::budget;
use crate::metrics::Metrics;
use crate::polar::Health;
use crate::problem::Problem;
use crate::recorder::Recorder;
use extract::{json_response, request_id, static_json};

pub struct Limits {
    pub max_body_bytes: usize,
    pub batch_max_body_bytes: usize,
    pub body_timeout: Duration,
    /// Batch requests read, parsed and recorded at once.
    pub batch_concurrency: usize,
    /// Longest wait for one of those slots.
    pub batch_wait: Duration,
}

/// Which listener a request came in on. The API listener serves clients and
/// load balancers; the admin listener (loopback by default) serves what only
/// operators should see: metrics and the detailed readiness report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    Api,
    Admin,
}

pub struct App {
    pub pools: Pools,
    pub metrics: Arc<Metrics>,
    pub recorder: Arc<Recorder>,
    pub admission: Admission,
    /// The body budget every connection draws on (for /metrics).
    pub bodies: budget::Budget,
    /// Polar's state as this sidecar sees it; None without a token.
    pub health: Option<Arc<Health>>,
    /// limits.batch_concurrency permits: batch requests in progress.
    pub batch_slots: tokio::sync::Semaphore,
    pub limits: Limits,
}

type Resp = Response<Full<Bytes>>;
type Handled = Result<Resp, Problem>;

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub async fn handle(app: Arc<App>, surface: Surface, req: Request<Incoming>) -> Resp {
    let started = Instant::now();
    let request_id = request_id(req.headers());
    let method = req.method().clone();
    let client = req
        .extensions()
        .get::<crate::http::Peer>()
        .map(|p| p.client.to_string())
        .unwrap_or_default();
    let (route, result) = match surface {
        Surface::Api => dispatch(&app, req).await,
        Surface::Admin => dispatch_admin(&app, req).await,
    };
    let mut resp = result.unwrap_or_else(|p| p.into_response(&request_id));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    let status = resp.status().as_u16();
    let secs = started.elapsed().as_secs_f64();
    app.metrics.observe(route, status, secs);
    let latency_ms = secs * 1e3;
    match status {
        500.. => {
            tracing::warn!(request_id, %method, route, status, latency_ms, client, "request failed")
        }
        400.. => {
            tracing::info!(request_id, %method, route, status, latency_ms, client, "request refused")
        }
        _ => tracing::debug!(request_id, %method, route, status, latency_ms, client, "request"),
    }
    resp
}

async fn dispatch(app: &App, req: Request<Incoming>) -> (&'static str, Handled) {
    let path = req.uri().path();
    let m = req.method();
    match path {
        "/api/v1/meter" => match *m {
            Method::POST => ("POST /api/v1/meter", meter::meter(app, req).await),
            _ => ("/api/v1/meter", Err(Problem::method_not_allowed("POST"))),
        },
        "/api/v1/meter/batch" => match *m {
            Method::POST => (
                "POST /api/v1/meter/batch",
                meter::meter_batch(app, req).await,
            ),
            _ => (
                "/api/v1/meter/batch",
                Err(Problem::method_not_allowed("POST")),
            ),
        },
        "/api/v1/api-keys" => match *m {
            Method::POST => ("POST /api/v1/api-keys", keys::create_key(app, req).await),
            Method::GET => ("GET /api/v1/api-keys", keys::list_keys(app, req).await),
            _ => (
                "/api/v1/api-keys",
                Err(Problem::method_not_allowed("GET, POST")),
            ),
        },
        p if p.starts_with("/api/v1/api-keys/") => match *m {
            Method::DELETE => {
                let id = p["/api/v1/api-keys/".len()..].to_string();
                (
                    "DELETE /api/v1/api-keys/{id}",
                    keys::revoke_key(app, req, &id).await,
                )
            }
            _ => (
                "/api/v1/api-keys/{id}",
                Err(Problem::method_not_allowed("DELETE")),
            ),
        },
        "/.well-known/agent-configuration" => match *m {
            Method::GET | Method::HEAD => (
                "GET /.well-known/agent-configuration",
                Ok(static_json(
                    crate::agent_config::document().to_string().into(),
                    "public, max-age=3600",
                )),
            ),
            _ => (
                "/.well-known/agent-configuration",
                Err(Problem::method_not_allowed("GET, HEAD")),
            ),
        },
        "/healthz" => (
            "GET /healthz",
            Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        ),
        // Bare: 200 or 503 for load balancers and health checks; what is
        // wrong is on the admin listener.
        "/readyz" => (
            "GET /readyz",
            ops::readyz(app)
                .await
                .map(|_| ready_bare())
                .map_err(|_| not_ready()),
        ),
        "/openapi.json" => (
            "GET /openapi.json",
            Ok(static_json(
                Bytes::from_static(include_bytes!("../../../docs/openapi.json")),
                "public, max-age=3600",
            )),
        ),
        _ => ("unmatched", Err(Problem::not_found())),
    }
}

async fn dispatch_admin(app: &App, req: Request<Incoming>) -> (&'static str, Handled) {
    match req.uri().path() {
        "/healthz" => (
            "GET /healthz",
            Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        ),
        "/readyz" => ("GET /readyz", ops::readyz(app).await),
        "/metrics" => ("GET /metrics", Ok(ops::metrics(app))),
        _ => ("unmatched", Err(Problem::not_found())),
    }
}

fn ready_bare() -> Resp {
    json_response(StatusCode::OK, &json!({"status": "ready"}))
}

fn not_ready() -> Problem {
    let mut p = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not-ready",
        "Not ready",
        "this instance cannot serve now; its admin listener's /readyz says why",
    );
    p.retry_after = Some(5);
    p
}

/// The one way a handler calls SQL: a pooled connection (a bounded wait, 503
/// past it), a prepared statement, the query, and database errors mapped to
/// problems.
/// A store error as the client sees it (logged when it is not the client's).
fn db_problem(e: &DbError) -> Problem {
    e.log();
    Problem::from_db(e)
}
