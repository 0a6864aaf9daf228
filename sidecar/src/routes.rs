//! Routing and handlers. Each handler makes at most one SQL call (a batch that
//! fails as a whole is retried item by item); everything it cannot decide from
//! HTTP alone is the extension's to judge.
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE,
    LOCATION,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::types::ToSql;

use crate::admission::Admission;
use crate::db::{DbError, Pools};
use crate::http::budget::{self, ConnectionBudget};
use crate::ingest::{Outcome, Recorder};
use crate::metrics::{Metrics, PoolUsage};
use crate::polar::Health;
use crate::problem::Problem;

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
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

const CREATE_KEY: &str =
    "SELECT id, key, start, granted, valid_until FROM meter.create_own_api_key($1::text, $2::text, $3::text[], $4::timestamptz)";
const LIST_KEYS: &str =
    "SELECT id, name, start, permissions, created_at, expires_at, revoked_at, last_used_at
     FROM meter.list_own_api_keys($1::text)";
const REVOKE_KEY: &str = "SELECT meter.revoke_own_api_key($1::text, $2::uuid)";
const VERSIONS: &str = "SELECT meter.extension_version(), meter.oldest_supported_sidecar()";

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
            Method::POST => ("POST /api/v1/meter", meter(app, req).await),
            _ => ("/api/v1/meter", Err(Problem::method_not_allowed("POST"))),
        },
        "/api/v1/meter/batch" => match *m {
            Method::POST => ("POST /api/v1/meter/batch", meter_batch(app, req).await),
            _ => (
                "/api/v1/meter/batch",
                Err(Problem::method_not_allowed("POST")),
            ),
        },
        "/api/v1/api-keys" => match *m {
            Method::POST => ("POST /api/v1/api-keys", create_key(app, req).await),
            Method::GET => ("GET /api/v1/api-keys", list_keys(app, req).await),
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
                    revoke_key(app, req, &id).await,
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
            readyz(app)
                .await
                .map(|_| ready_bare())
                .map_err(|_| not_ready()),
        ),
        "/openapi.json" => (
            "GET /openapi.json",
            Ok(static_json(
                Bytes::from_static(include_bytes!("../../docs/openapi.json")),
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
        "/readyz" => ("GET /readyz", readyz(app).await),
        "/metrics" => ("GET /metrics", Ok(metrics(app))),
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
async fn sql(
    app: &App,
    query: &'static str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, Problem> {
    let run = async {
        let c = app.pools.requests.get().await?;
        let stmt = c.prepare_cached(query).await?;
        Ok::<_, DbError>(c.query(&stmt, params).await?)
    };
    run.await.map_err(|e| db_problem(&e))
}

fn db_problem(e: &DbError) -> Problem {
    e.log();
    Problem::from_db(e)
}

fn one(rows: Vec<tokio_postgres::Row>) -> Result<tokio_postgres::Row, Problem> {
    rows.into_iter().next().ok_or_else(Problem::internal)
}

// ---- POST /api/v1/meter -------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MeterBody {
    event_name: String,
    event_timestamp: String,
    #[serde(default = "empty_object", deserialize_with = "strict_object")]
    metadata: Value,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

async fn meter(app: &App, req: Request<Incoming>) -> Handled {
    let key = bearer(req.headers())?;
    if let Err(p) = app.admission.admit(&key).await {
        discard_rest(req.into_body()).await;
        return Err(p);
    }
    let idem = match req.headers().get(&IDEMPOTENCY_KEY) {
        None => {
            return Err(Problem::bad_idempotency_key(
                "the Idempotency-Key header is required",
            ))
        }
        Some(v) => v
            .to_str()
            .map_err(|_| Problem::bad_idempotency_key("Idempotency-Key must be printable ASCII"))?
            .to_string(),
    };
    let body: MeterBody = read_json(app, req, app.limits.max_body_bytes).await?;
    let event = json!({
        "idempotency_key": idem,
        "event_name": body.event_name,
        "event_timestamp": body.event_timestamp,
        "metadata": body.metadata,
    });
    let r = app.recorder.record_one(key, event).await?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({"status": r.status, "event_id": r.event_id}),
    ))
}

// ---- POST /api/v1/meter/batch ---------------------------------------------

async fn meter_batch(app: &App, req: Request<Incoming>) -> Handled {
    let key = bearer(req.headers())?;
    // The key first: without a valid one, nothing scarce is taken.
    if let Err(p) = app.admission.admit(&key).await {
        discard_rest(req.into_body()).await;
        return Err(p);
    }
    // Taken before the body is read: a waiting batch holds only its socket.
    let Ok(Ok(_slot)) =
        tokio::time::timeout(app.limits.batch_wait, app.batch_slots.acquire()).await
    else {
        discard_rest(req.into_body()).await;
        let mut p = Problem::overloaded();
        p.detail = "no event of the batch was recorded; send it again as it is".into();
        return Err(p);
    };
    let body: StrictJson = read_json(app, req, app.limits.batch_max_body_bytes).await?;
    let Value::Object(mut envelope) = body.0 else {
        return Err(Problem::malformed_body(
            "the body must be a JSON object {\"events\": [...]}",
        ));
    };
    let events = envelope.remove("events").unwrap_or(Value::Null);
    if let Some(k) = envelope.keys().next() {
        return Err(Problem::malformed_body(format!(
            "unknown field {k:?} (the body has only \"events\")"
        )));
    }
    // The envelope's rule is the extension's (polar_meter_rules::batch), checked
    // here too so that a bad envelope costs no database call.
    polar_meter_rules::batch::envelope(&events)
        .map_err(|v| Problem::from_sql(v.sqlstate, &v.message))?;
    let Value::Array(events) = events else {
        return Err(Problem::internal());
    };
    let outcomes = app.recorder.record(&key, events).await;
    // A key error or an outage is the same for every item: answer it whole.
    if let Some(Err(p)) = outcomes.first() {
        if outcomes
            .iter()
            .all(|o| matches!(o, Err(q) if q.slug == p.slug))
            && (p.status == StatusCode::UNAUTHORIZED
                || p.status == StatusCode::FORBIDDEN
                || p.status.is_server_error())
        {
            return Err(p.clone());
        }
    }
    let results: Vec<Value> = outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| item_json(i, o))
        .collect();
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "results": results }),
    ))
}

fn item_json(index: usize, o: Outcome) -> Value {
    match o {
        Ok(r) => json!({"status": r.status, "event_id": r.event_id}),
        Err(p) => {
            let mut problem = p.body();
            problem["index"] = json!(index);
            json!({"status": "error", "problem": problem})
        }
    }
}

// ---- API keys -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeyBody {
    name: String,
    #[serde(default)]
    permissions: Option<Vec<String>>,
    #[serde(default)]
    expires_at: Option<String>,
}

async fn create_key(app: &App, req: Request<Incoming>) -> Handled {
    let key = bearer(req.headers())?;
    let body: CreateKeyBody = read_json(app, req, app.limits.max_body_bytes).await?;
    let expires_at = match body.expires_at.as_deref() {
        None => None,
        Some(s) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.to_utc())
                .map_err(|_| {
                    Problem::from_sql(
                        polar_meter_rules::sqlstate::KEY_EXPIRY,
                        "expires_at must be RFC 3339 with a timezone, like 2027-01-31T00:00:00Z",
                    )
                })?,
        ),
    };
    let row = one(sql(
        app,
        CREATE_KEY,
        &[&key, &body.name, &body.permissions, &expires_at],
    )
    .await?)?;
    let id: uuid::Uuid = row.get(0);
    let start: String = row.get(2);
    tracing::info!(key_id = %id, start, "api key created over HTTP");
    let mut resp = json_response(
        StatusCode::CREATED,
        &json!({
            "id": id,
            "key": row.get::<_, String>(1),
            "start": start,
            "name": body.name,
            "permissions": row.get::<_, Vec<String>>(3),
            "expires_at": row.get::<_, Option<chrono::DateTime<chrono::Utc>>>(4),
        }),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/api-keys/{id}")) {
        resp.headers_mut().insert(LOCATION, v);
    }
    Ok(resp)
}

async fn list_keys(app: &App, req: Request<Incoming>) -> Handled {
    let key = bearer(req.headers())?;
    let rows = sql(app, LIST_KEYS, &[&key]).await?;
    type Ts = Option<chrono::DateTime<chrono::Utc>>;
    let data: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.get::<_, uuid::Uuid>(0),
                "name": r.get::<_, String>(1),
                "start": r.get::<_, String>(2),
                "permissions": r.get::<_, Vec<String>>(3),
                "created_at": r.get::<_, chrono::DateTime<chrono::Utc>>(4),
                "expires_at": r.get::<_, Ts>(5),
                "revoked_at": r.get::<_, Ts>(6),
                "last_used_at": r.get::<_, Ts>(7),
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({ "data": data })))
}

async fn revoke_key(app: &App, req: Request<Incoming>, id: &str) -> Handled {
    let key = bearer(req.headers())?;
    // Not a UUID: no key can have that id.
    let id: uuid::Uuid = id.parse().map_err(|_| Problem::not_found())?;
    let row = one(sql(app, REVOKE_KEY, &[&key, &id]).await?)?;
    let revoked_at: chrono::DateTime<chrono::Utc> = row.get(0);
    tracing::info!(key_id = %id, "api key revoked over HTTP");
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": id, "revoked_at": revoked_at}),
    ))
}

// ---- discovery, health, metrics ------------------------------------------

fn static_json(body: Bytes, cache: &'static str) -> Resp {
    let mut r = Response::new(Full::new(body));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static(cache));
    r
}

fn version(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split(['.', '-', '+']).map(|p| p.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// Ready when the database answers and the installed extension serves this
/// binary: at least the oldest version whose functions it calls, and no newer
/// than one that still serves it (so `ALTER EXTENSION ... UPDATE` before the
/// sidecars are replaced keeps them in rotation).
async fn readyz(app: &App) -> Handled {
    let rows = match sql(app, VERSIONS, &[]).await {
        Err(p) if p.status == StatusCode::INTERNAL_SERVER_ERROR => {
            // meter.oldest_supported_sidecar() is missing: an extension before 0.3.0.
            return Err(version_problem(
                "an older polar_meter, without meter.oldest_supported_sidecar()".into(),
            ));
        }
        other => other?,
    };
    let row = one(rows)?;
    let installed: Option<String> = row.get(0);
    let oldest: String = row.get(1);
    let inst = installed.as_deref().and_then(version);
    let ok = inst.is_some_and(|v| Some(v) >= version(crate::MIN_EXTENSION))
        && version(&oldest) <= version(crate::VERSION);
    if !ok {
        return Err(version_problem(format!(
            "polar_meter {} (which serves polar-meterd {oldest} and later)",
            installed.as_deref().unwrap_or("none")
        )));
    }
    let delivery = match &app.health {
        None => json!({"enabled": false, "paused": false}),
        Some(h) => match h.paused() {
            Some((cause, since)) => {
                json!({"enabled": true, "paused": true, "cause": cause, "paused_for_seconds": since.elapsed().as_secs()})
            }
            None => json!({"enabled": true, "paused": false}),
        },
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": "ready", "version": crate::VERSION, "extension_version": installed,
                "polar_version": crate::polar::POLAR_VERSION, "delivery": delivery}),
    ))
}

fn version_problem(have: String) -> Problem {
    let mut p = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "extension-version-mismatch",
        "Extension version mismatch",
        format!(
            "polar-meterd {} needs polar_meter {} or later that still serves it; the database has {have}",
            crate::VERSION,
            crate::MIN_EXTENSION
        ),
    );
    p.retry_after = Some(30);
    p
}

fn metrics(app: &App) -> Resp {
    let usage = |name, pool: &deadpool_postgres::Pool| {
        let s = pool.status();
        PoolUsage {
            name,
            max: s.max_size,
            size: s.size,
            available: s.available,
            waiting: s.waiting,
        }
    };
    let batches = app.limits.batch_concurrency - app.batch_slots.available_permits();
    let text = app.metrics.render(
        &[
            usage("requests", &app.pools.requests),
            usage("background", &app.pools.background),
        ],
        batches,
        app.recorder.pending_events(),
        app.bodies.in_use(),
    );
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

// ---- helpers ---------------------------------------------------------------

/// The bearer token, unchecked: its format, existence and rights are the
/// extension's to judge. Never logged.
fn bearer(h: &HeaderMap) -> Result<String, Problem> {
    let v = h
        .get(AUTHORIZATION)
        .ok_or_else(Problem::missing_credentials)?;
    let v = v.to_str().map_err(|_| Problem::missing_credentials())?;
    let (scheme, token) = v.split_once(' ').ok_or_else(Problem::missing_credentials)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(Problem::missing_credentials());
    }
    Ok(token.trim().to_string())
}

fn is_json(h: &HeaderMap) -> bool {
    let Some(ct) = h.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = ct.split(';').next().unwrap_or("").trim();
    mime.eq_ignore_ascii_case("application/json")
}

/// Reads and parses a JSON body: 415 unless JSON, 413 past `limit` (checked
/// against Content-Length up front and enforced while reading), 408 past the
/// body deadline, 400 with the offending field's path otherwise.
async fn read_json<T: for<'de> Deserialize<'de>>(
    app: &App,
    req: Request<Incoming>,
    limit: usize,
) -> Result<T, Problem> {
    let json = is_json(req.headers());
    let conn_budget = req.extensions().get::<ConnectionBudget>().cloned();
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    if !json {
        discard_rest(body).await;
        return Err(Problem::unsupported_media_type());
    }
    if declared.is_some_and(|n| n > limit as u64) {
        discard_rest(body).await;
        return Err(Problem::too_large(limit));
    }
    let deadline = app.limits.body_timeout;
    // Held until the body is parsed: the bytes read count against the
    // process's and the connection's budgets.
    let mut held = budget::Held::default();
    let read = async {
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Err(Problem::malformed_body(
                    "the request body could not be read",
                ));
            };
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    discard_rest(body).await;
                    return Err(Problem::too_large(limit));
                }
                if let Some(b) = &conn_budget {
                    b.take(&mut held, data.len()).await?;
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(buf)
    };
    let buf = tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| Problem::body_timeout(deadline.as_secs()))??;
    let _held = held;
    let de = &mut serde_json::Deserializer::from_slice(&buf);
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            Problem::malformed_body(format!("body is not valid: {inner}"))
        } else {
            Problem::malformed_body(format!("{path}: {inner}"))
        }
    })?;
    Ok(value)
}

/// Reads and drops what is left of a refused body, so that a client still
/// writing it reads our answer rather than a reset connection (a "lingering
/// close", as nginx does). Bounded in bytes and time: past either, hyper
/// closes the connection after the answer.
async fn discard_rest(mut body: Incoming) {
    const MAX_DISCARD: usize = 1 << 20;
    let drain = async {
        let mut seen = 0;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > MAX_DISCARD {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// Any JSON value whose objects have unique keys, at every depth. serde_json
/// would keep the last of two equal keys silently; for a billing record an
/// ambiguous body is refused.
struct StrictJson(Value);

impl<'de> Deserialize<'de> for StrictJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Strict.deserialize(d).map(StrictJson)
    }
}

struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = s.next_element_seed(Strict)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = m.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
            }
            let v = m.next_value_seed(Strict)?;
            out.insert(k, v);
        }
        // serde_json's arbitrary_precision numbers arrive as a one-key map;
        // hand them on as the number they are.
        Ok(match out.len() {
            1 if out.contains_key("$serde_json::private::Number") => {
                serde_json::from_value(Value::Object(out)).unwrap_or(Value::Null)
            }
            _ => Value::Object(out),
        })
    }
}

/// A JSON object whose keys are unique at every depth.
fn strict_object<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    match Strict.deserialize(d)? {
        v @ Value::Object(_) => Ok(v),
        other => Err(serde::de::Error::custom(format!(
            "expected a JSON object, got {other}"
        ))),
    }
}

fn json_response(status: StatusCode, v: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The client's X-Request-Id when it is short and plain, else a fresh one.
fn request_id(h: &HeaderMap) -> String {
    h.get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer ak_x")])).unwrap(),
            "ak_x"
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "bearer  ak_x ")])).unwrap(),
            "ak_x"
        );
        for bad in ["Basic abc", "Bearer", "Bearer ", "ak_x", ""] {
            assert!(
                bearer(&headers(&[("authorization", bad)])).is_err(),
                "{bad:?}"
            );
        }
        assert!(bearer(&HeaderMap::new()).is_err());
    }

    #[test]
    fn json_media_types() {
        assert!(is_json(&headers(&[("content-type", "application/json")])));
        assert!(is_json(&headers(&[(
            "content-type",
            "Application/JSON; charset=utf-8"
        )])));
        assert!(!is_json(&headers(&[("content-type", "text/plain")])));
        assert!(!is_json(&headers(&[("content-type", "application/jsonx")])));
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn body_shape() {
        let ok: MeterBody =
            serde_json::from_str(r#"{"event_name":"a","event_timestamp":"t"}"#).unwrap();
        assert_eq!(ok.metadata, json!({}));
        assert!(serde_json::from_str::<MeterBody>(
            r#"{"event_name":"a","event_timestamp":"t","extra":1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<MeterBody>(
            r#"{"event_name":"a","event_name":"b","event_timestamp":"t"}"#
        )
        .is_err());
        let dup = serde_json::from_str::<MeterBody>(
            r#"{"event_name":"a","event_timestamp":"t","metadata":{"k":1,"k":2}}"#,
        );
        assert!(dup.err().unwrap().to_string().contains("duplicate key"));
        assert!(serde_json::from_str::<MeterBody>(
            r#"{"event_name":"a","event_timestamp":"t","metadata":[1]}"#
        )
        .is_err());
    }

    #[test]
    fn strict_json_refuses_duplicate_keys_at_any_depth_and_keeps_numbers_exact() {
        let v: StrictJson =
            serde_json::from_str(r#"{"events":[{"a":{"b":123456789012345678901234567890}}]}"#)
                .unwrap();
        assert_eq!(
            v.0["events"][0]["a"]["b"].to_string(),
            "123456789012345678901234567890"
        );
        for bad in [
            r#"{"a":1,"a":2}"#,
            r#"{"events":[{"k":1,"k":1}]}"#,
            r#"[{"x":{"y":1,"y":2}}]"#,
        ] {
            let e = serde_json::from_str::<StrictJson>(bad).err().expect(bad);
            assert!(e.to_string().contains("duplicate key"), "{bad}: {e}");
        }
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version("0.10.0") > version("0.9.9"));
        assert_eq!(version("0.3.0-rc1"), Some((0, 3, 0)));
        assert_eq!(version("x"), None);
    }

    #[test]
    fn request_ids() {
        assert_eq!(
            request_id(&headers(&[("x-request-id", "abc-123")])),
            "abc-123"
        );
        assert_eq!(
            request_id(&headers(&[("x-request-id", "bad id with spaces")])).len(),
            32
        );
    }
}
