//! Routing and handlers. Each handler makes at most one SQL call; everything
//! it cannot decide from HTTP alone is the extension's to judge.
use bytes::Bytes;
use deadpool_postgres::Pool;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE,
    LOCATION,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::db::DbError;
use crate::metrics::{Metrics, PoolUsage};
use crate::problem::Problem;

pub struct App {
    pub pool: Pool,
    pub metrics: Metrics,
    pub max_body_bytes: usize,
}

type Resp = Response<Full<Bytes>>;
type Handled = Result<Resp, Problem>;

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

const RECORD_EVENT: &str =
    "SELECT status, event_id FROM meter.record_event($1::text, $2::text, $3::text, $4::text, $5::jsonb)";
const CREATE_KEY: &str =
    "SELECT id, key, start, granted, valid_until FROM meter.create_own_api_key($1::text, $2::text, $3::text[], $4::timestamptz)";
const LIST_KEYS: &str =
    "SELECT id, name, start, permissions, created_at, expires_at, revoked_at, last_used_at
     FROM meter.list_own_api_keys($1::text)";
const REVOKE_KEY: &str = "SELECT meter.revoke_own_api_key($1::text, $2::uuid)";
const EXTENSION_VERSION: &str = "SELECT meter.extension_version()";

pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Resp {
    let started = Instant::now();
    let request_id = request_id(req.headers());
    let method = req.method().clone();
    let (route, result) = dispatch(&app, req).await;
    let mut resp = result.unwrap_or_else(|p| p.into_response(&request_id));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    let status = resp.status().as_u16();
    let secs = started.elapsed().as_secs_f64();
    app.metrics.observe(route, status, secs);
    let latency_ms = secs * 1e3;
    match status {
        500.. => tracing::warn!(request_id, %method, route, status, latency_ms, "request failed"),
        400.. => tracing::info!(request_id, %method, route, status, latency_ms, "request refused"),
        _ => tracing::debug!(request_id, %method, route, status, latency_ms, "request"),
    }
    resp
}

async fn dispatch(app: &App, req: Request<Incoming>) -> (&'static str, Handled) {
    let path = req.uri().path();
    let m = req.method();
    match path {
        "/api/v1/meter" => match *m {
            Method::POST => ("POST /api/v1/meter", meter(app, req).await),
            _ => ("/api/v1/meter", Err(not_allowed("POST"))),
        },
        "/api/v1/api-keys" => match *m {
            Method::POST => ("POST /api/v1/api-keys", create_key(app, req).await),
            Method::GET => ("GET /api/v1/api-keys", list_keys(app, req).await),
            _ => ("/api/v1/api-keys", Err(not_allowed("GET, POST"))),
        },
        p if p.starts_with("/api/v1/api-keys/") => match *m {
            Method::DELETE => {
                let id = p["/api/v1/api-keys/".len()..].to_string();
                (
                    "DELETE /api/v1/api-keys/{id}",
                    revoke_key(app, req, &id).await,
                )
            }
            _ => ("/api/v1/api-keys/{id}", Err(not_allowed("DELETE"))),
        },
        "/.well-known/agent-configuration" => match *m {
            Method::GET | Method::HEAD => (
                "GET /.well-known/agent-configuration",
                Ok(agent_configuration()),
            ),
            _ => (
                "/.well-known/agent-configuration",
                Err(not_allowed("GET, HEAD")),
            ),
        },
        "/healthz" => (
            "GET /healthz",
            Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        ),
        "/readyz" => ("GET /readyz", readyz(app).await),
        "/metrics" => ("GET /metrics", Ok(metrics(app))),
        "/openapi.json" => ("GET /openapi.json", Ok(openapi())),
        _ => ("unmatched", Err(Problem::not_found())),
    }
}

fn not_allowed(allow: &'static str) -> Problem {
    let mut p = Problem::method_not_allowed();
    p.detail = format!("allowed: {allow}");
    p.allow = Some(allow);
    p
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
    let body: MeterBody = read_json(app, req).await?;
    let client = app.pool.get().await.map_err(|e| db_problem(e.into()))?;
    let stmt = client
        .prepare_cached(RECORD_EVENT)
        .await
        .map_err(|e| db_problem(e.into()))?;
    let row = client
        .query_one(
            &stmt,
            &[
                &key,
                &idem,
                &body.event_name,
                &body.event_timestamp,
                &body.metadata,
            ],
        )
        .await
        .map_err(|e| db_problem(e.into()))?;
    let status: String = row.get(0);
    let event_id: uuid::Uuid = row.get(1);
    let counter = if status == "recorded" {
        &app.metrics.events_recorded
    } else {
        &app.metrics.events_already_recorded
    };
    counter.fetch_add(1, Ordering::Relaxed);
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({"status": status, "event_id": event_id}),
    ))
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
    let body: CreateKeyBody = read_json(app, req).await?;
    let expires_at = match body.expires_at.as_deref() {
        None => None,
        Some(s) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.to_utc())
                .map_err(|_| {
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        "invalid-argument",
                        "Invalid argument",
                        "expires_at must be RFC 3339 with a timezone, like 2027-01-31T00:00:00Z",
                    )
                })?,
        ),
    };
    let client = app.pool.get().await.map_err(|e| db_problem(e.into()))?;
    let stmt = client
        .prepare_cached(CREATE_KEY)
        .await
        .map_err(|e| db_problem(e.into()))?;
    let row = client
        .query_one(&stmt, &[&key, &body.name, &body.permissions, &expires_at])
        .await
        .map_err(|e| db_problem(e.into()))?;
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
    let client = app.pool.get().await.map_err(|e| db_problem(e.into()))?;
    let stmt = client
        .prepare_cached(LIST_KEYS)
        .await
        .map_err(|e| db_problem(e.into()))?;
    let rows = client
        .query(&stmt, &[&key])
        .await
        .map_err(|e| db_problem(e.into()))?;
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
    let client = app.pool.get().await.map_err(|e| db_problem(e.into()))?;
    let stmt = client
        .prepare_cached(REVOKE_KEY)
        .await
        .map_err(|e| db_problem(e.into()))?;
    let row = client
        .query_one(&stmt, &[&key, &id])
        .await
        .map_err(|e| db_problem(e.into()))?;
    let revoked_at: chrono::DateTime<chrono::Utc> = row.get(0);
    tracing::info!(key_id = %id, "api key revoked over HTTP");
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": id, "revoked_at": revoked_at}),
    ))
}

// ---- discovery, health, metrics ------------------------------------------

fn agent_configuration() -> Resp {
    let mut r = json_response(StatusCode::OK, &crate::agent_config::document());
    r.headers_mut().insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    r
}

/// docs/openapi.json, compiled in: the document describes this binary.
fn openapi() -> Resp {
    let mut r = Response::new(Full::new(Bytes::from_static(include_bytes!(
        "../../docs/openapi.json"
    ))));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    r
}

async fn readyz(app: &App) -> Handled {
    let client = app.pool.get().await.map_err(|e| db_problem(e.into()))?;
    let stmt = client
        .prepare_cached(EXTENSION_VERSION)
        .await
        .map_err(|e| db_problem(e.into()))?;
    let row = client
        .query_one(&stmt, &[])
        .await
        .map_err(|e| db_problem(e.into()))?;
    let installed: Option<String> = row.get(0);
    if installed.as_deref() != Some(crate::VERSION) {
        let mut p = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "extension-version-mismatch",
            "Extension version mismatch",
            format!(
                "polar-meterd {} needs polar_meter {} but the database has {}",
                crate::VERSION,
                crate::VERSION,
                installed.as_deref().unwrap_or("none")
            ),
        );
        p.retry_after = Some(30);
        return Err(p);
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": "ready", "version": crate::VERSION, "extension_version": installed,
                "polar_version": crate::polar::POLAR_VERSION}),
    ))
}

fn metrics(app: &App) -> Resp {
    let s = app.pool.status();
    let text = app.metrics.render(&PoolUsage {
        max: s.max_size,
        size: s.size,
        available: s.available,
        waiting: s.waiting,
    });
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

// ---- helpers ---------------------------------------------------------------

fn db_problem(e: DbError) -> Problem {
    let p = Problem::from_db(&e);
    if p.status.is_server_error() {
        // The message is PostgreSQL's or the pool's; neither carries secrets.
        tracing::warn!(error = ?e, "database call failed");
    }
    p
}

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

/// Reads and parses a JSON body: 415 unless JSON, 413 past the limit (checked
/// against Content-Length up front and enforced while reading), 400 with the
/// offending field's path otherwise.
async fn read_json<T: for<'de> Deserialize<'de>>(
    app: &App,
    req: Request<Incoming>,
) -> Result<T, Problem> {
    let limit = app.max_body_bytes;
    let json = is_json(req.headers());
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
    let mut buf = Vec::with_capacity(declared.unwrap_or(0) as usize);
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
            buf.extend_from_slice(&data);
        }
    }
    let body = buf;
    let de = &mut serde_json::Deserializer::from_slice(&body);
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
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
}

/// A JSON object whose keys are unique. serde_json would keep the last of two
/// equal keys silently; for a billing record an ambiguous body is refused.
fn strict_object<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
            let mut out = Map::new();
            while let Some((k, v)) = m.next_entry::<String, Value>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
                }
                out.insert(k, v);
            }
            Ok(Value::Object(out))
        }
    }
    d.deserialize_map(V)
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
    fn request_ids() {
        assert_eq!(
            request_id(&headers(&[("x-request-id", "abc-123")])),
            "abc-123"
        );
        let fresh = request_id(&headers(&[("x-request-id", "bad id with spaces")]));
        assert_eq!(fresh.len(), 32);
    }
}
