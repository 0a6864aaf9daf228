//! HTTP surface of the emulator. Paths, status codes and bodies follow
//! Polar's (docs/polar.md §1-§5); `/__admin/*` is the emulator's own.
use bytes::Bytes;
use chrono::Utc;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::{Customer, Event, Faults, Store};

pub type Shared = Arc<Mutex<Store>>;
type Resp = Response<Full<Bytes>>;

pub const MAX_BODY: usize = 10 * 1024 * 1024;
const VERSIONS: [&str; 2] = ["2026-04", "2026-10"];

/// What the connection should do with a response: send it, or (the
/// "committed, then the connection dropped" fault) close without answering.
pub enum Outcome {
    Respond(Resp),
    Drop,
}

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn not_found() -> Resp {
    json_resp(
        StatusCode::NOT_FOUND,
        &json!({"error": "ResourceNotFound", "detail": "Not found"}),
    )
}

fn unauthorized() -> Resp {
    with_www_authenticate(
        json_resp(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "Unauthorized", "detail": "Unauthorized"}),
        ),
        "Bearer realm=\"polar\"",
    )
}

fn invalid_token() -> Resp {
    with_www_authenticate(
        json_resp(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "invalid_token", "error_description": "The access token provided is expired, revoked, malformed, or invalid for other reasons."}),
        ),
        "Bearer realm=\"polar\", error=\"invalid_token\"",
    )
}

fn with_www_authenticate(mut r: Resp, value: impl AsRef<str>) -> Resp {
    let v = HeaderValue::from_str(value.as_ref()).expect("an ASCII header");
    r.headers_mut().insert(WWW_AUTHENTICATE, v);
    r
}

/// The scopes of which an operation needs one (docs/polar.md §4).
fn scopes_needed(method: &Method, path: &str) -> Option<&'static [&'static str]> {
    match (method, path) {
        (&Method::POST, "/v1/events/ingest") => Some(&["events:write"]),
        (&Method::GET, "/v1/events/") => Some(&["events:read", "events:write"]),
        (&Method::POST, "/v1/customers/") => Some(&["customers:write"]),
        (&Method::PATCH, p) if p.starts_with("/v1/customers/") => Some(&["customers:write"]),
        (&Method::GET, p) if p.starts_with("/v1/customers/") => {
            Some(&["customers:read", "customers:write"])
        }
        _ => None,
    }
}

fn insufficient_scope(scope: &str) -> Resp {
    with_www_authenticate(
        json_resp(
            StatusCode::FORBIDDEN,
            &json!({"error": "insufficient_scope", "error_description": "The request requires higher privileges than provided by the access token."}),
        ),
        format!("Bearer realm=\"polar\", error=\"insufficient_scope\", scope=\"{scope}\""),
    )
}

fn validation(kind: &str, detail: Vec<Value>) -> Resp {
    json_resp(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({"error": kind, "detail": detail}),
    )
}

fn rand01() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 64) as f64 / (u64::MAX as f64 + 1.0)
}

pub async fn handle(store: Shared, req: Request<Incoming>) -> Outcome {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let version = req
        .headers()
        .get("polar-version")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let out = if path.starts_with("/__admin/") {
        admin(&store, req, &path).await
    } else {
        api(&store, req, &path, version.as_deref()).await
    };
    let key = match &out {
        Outcome::Respond(r) => format!("{method} {path} {}", r.status().as_u16()),
        Outcome::Drop => format!("{method} {path} dropped"),
    };
    *store.lock().unwrap().stats.entry(key).or_default() += 1;
    match out {
        Outcome::Respond(mut r) => {
            let v = version
                .filter(|v| VERSIONS.contains(&v.as_str()))
                .unwrap_or_else(|| VERSIONS[0].into());
            r.headers_mut()
                .insert("polar-version", HeaderValue::from_str(&v).unwrap());
            if store.lock().unwrap().sandbox {
                r.headers_mut()
                    .insert("x-polar-sandbox", HeaderValue::from_static("1"));
            }
            Outcome::Respond(r)
        }
        drop => drop,
    }
}

async fn api(store: &Shared, req: Request<Incoming>, path: &str, version: Option<&str>) -> Outcome {
    if version.is_some_and(|v| !VERSIONS.contains(&v)) {
        return Outcome::Respond(json_resp(
            StatusCode::NOT_FOUND,
            &json!({"detail": "Not Found"}),
        ));
    }
    // Exact trailing-slash paths; the other form is redirected, as FastAPI does.
    for (bare, canonical) in [
        ("/v1/events", "/v1/events/"),
        ("/v1/customers", "/v1/customers/"),
        ("/v1/events/ingest/", "/v1/events/ingest"),
    ] {
        if path == bare {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            r.headers_mut()
                .insert(LOCATION, HeaderValue::from_static(canonical));
            return Outcome::Respond(r);
        }
    }
    // Auth: Bearer polar_oat_... naming one organization.
    let grant = {
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let Some((scheme, token)) = auth.split_once(' ') else {
            return Outcome::Respond(unauthorized());
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Outcome::Respond(unauthorized());
        }
        let s = store.lock().unwrap();
        match s.tokens.get(token.trim()) {
            Some(_)
                if s.faults.reject_token
                    && s.faults
                        .applies(req.method().as_str(), &path_and_query(&req)) =>
            {
                return Outcome::Respond(invalid_token())
            }
            Some(g) => g.clone(),
            None => return Outcome::Respond(invalid_token()),
        }
    };
    let org = grant.org;
    // Rate limit, then injected faults (a fault is a request Polar saw).
    let faults: Faults = {
        let mut s = store.lock().unwrap();
        if let Err(wait) = s.take_rate(org) {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(wait));
            return Outcome::Respond(r);
        }
        let f = s.faults.clone();
        if f.applies(req.method().as_str(), &path_and_query(&req)) {
            f
        } else {
            Faults {
                clock_offset_ms: f.clock_offset_ms,
                ..Faults::default()
            }
        }
    };
    if let Some(needed) = scopes_needed(req.method(), path) {
        if !grant.allows(needed) {
            return Outcome::Respond(insufficient_scope(needed[0]));
        }
    }
    if rand01() < faults.rate_429 {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(1));
        return Outcome::Respond(r);
    }
    if rand01() < faults.error_5xx {
        let code = match faults
            .error_status
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(c) => c,
            None if rand01() < 0.5 => StatusCode::INTERNAL_SERVER_ERROR,
            None => StatusCode::BAD_GATEWAY,
        };
        return Outcome::Respond(json_resp(
            code,
            &json!({"error": "InternalServerError", "detail": "injected"}),
        ));
    }
    let timeout = rand01() < faults.timeout;
    let drop_after_commit = rand01() < faults.commit_then_drop;

    let method = req.method().clone();
    let out = match (&method, path) {
        (&Method::POST, "/v1/events/ingest") => ingest(store, org, req).await,
        (&Method::GET, "/v1/events/") => list_events(store, org, req.uri().query().unwrap_or("")),
        (&Method::POST, "/v1/customers/") => create_customer(store, org, req).await,
        (&Method::GET, p) if p.starts_with("/v1/customers/external/") => {
            let ext = decode(&p["/v1/customers/external/".len()..]);
            let s = store.lock().unwrap();
            match s.customer_by_external(org, &ext) {
                Some(c) => json_resp(StatusCode::OK, &customer_json(c)),
                None => not_found(),
            }
        }
        (&Method::PATCH, p) if p.starts_with("/v1/customers/") => {
            update_customer(store, org, req, &p["/v1/customers/".len()..]).await
        }
        _ => not_found(),
    };
    if timeout {
        tokio::time::sleep(Duration::from_millis(faults.delay_ms.max(1))).await;
    }
    if drop_after_commit {
        if path == "/v1/events/ingest" && out.status() == StatusCode::OK {
            let body = out
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let inserted = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["inserted"].as_u64());
            store.lock().unwrap().unacknowledged_inserts += inserted.unwrap_or(0);
        }
        return Outcome::Drop;
    }
    Outcome::Respond(out)
}

fn path_and_query(req: &Request<Incoming>) -> String {
    req.uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default()
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Resp> {
    if req.headers().get(CONTENT_LENGTH).is_none() {
        return Err(json_resp(
            StatusCode::LENGTH_REQUIRED,
            &json!({"error": "LengthRequired", "detail": "A Content-Length header is required."}),
        ));
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = || {
        json_resp(
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!({"error": "RequestBodyTooLarge", "detail": format!("Request body exceeded the maximum allowed size of {MAX_BODY} bytes.")}),
        )
    };
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(too_large()),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, Resp> {
    serde_json::from_slice(body).map_err(|e| {
        validation(
            "RequestValidationError",
            vec![json!({"type": "json_invalid", "loc": ["body", 0], "msg": format!("JSON decode error: {e}"), "input": {}})],
        )
    })
}

async fn ingest(store: &Shared, org: uuid::Uuid, req: Request<Incoming>) -> Resp {
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let v = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let now = Utc::now();
    let offset = store.lock().unwrap().faults.clock_offset_ms;
    let parsed = match crate::validate::ingest(&v, now + chrono::Duration::milliseconds(offset)) {
        Ok(p) => p,
        Err(detail) => return validation("RequestValidationError", detail),
    };
    let mut s = store.lock().unwrap();
    s.ingest_requests += 1;
    // Service-level checks, accumulated; any error rejects the whole batch.
    let mut errors = Vec::new();
    for (i, p) in parsed.iter().enumerate() {
        if p.organization_id_set {
            errors.push(json!({"type": "organization_token", "loc": ["body", "events", i, "organization_id"],
                "msg": "Setting organization_id is disallowed when using an organization token.", "input": v["events"][i]["organization_id"]}));
        }
        if let Some(cid) = &p.customer_id {
            let known = s
                .orgs
                .get(&org)
                .is_some_and(|o| o.customers.iter().any(|c| c.id.to_string() == *cid));
            if !known {
                errors.push(json!({"type": "customer_id", "loc": ["body", "events", i, "customer_id"], "msg": "Customer not found.", "input": cid}));
            }
        }
    }
    if !errors.is_empty() {
        return validation("PolarRequestValidationError", errors);
    }
    let delay = s.visibility_delay;
    let o = s.orgs.entry(org).or_default();
    let mut inserted = 0u64;
    for p in parsed {
        // ON CONFLICT (organization_id, external_id) DO NOTHING; NULL never conflicts.
        if let Some(ext) = &p.external_id {
            if !o.external_ids.insert(ext.clone()) {
                continue;
            }
        }
        inserted += 1;
        o.events.push(Event {
            id: uuid::Uuid::new_v4(),
            organization_id: org,
            name: p.name,
            timestamp: p.timestamp,
            ingested_at: now,
            visible_at: Instant::now() + delay,
            external_customer_id: p.external_customer_id,
            customer_id: p.customer_id.and_then(|c| c.parse().ok()),
            external_id: p.external_id,
            metadata: p.metadata,
        });
    }
    let total = v["events"].as_array().map_or(0, |a| a.len() as u64);
    s.duplicates_seen += total - inserted;
    json_resp(
        StatusCode::OK,
        &json!({"inserted": inserted, "duplicates": total - inserted}),
    )
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn customer_json(c: &Customer) -> Value {
    json!({
        "id": c.id, "created_at": c.created_at, "modified_at": c.modified_at, "metadata": c.metadata,
        "external_id": c.external_id, "email": c.email, "email_verified": false, "type": c.kind,
        "name": c.name, "billing_name": c.name, "billing_address": null, "tax_id": null, "locale": null,
        "organization_id": c.organization_id, "default_payment_method_id": null, "deleted_at": null,
        "first_user_event_at": null, "avatar_url": format!("https://www.gravatar.com/avatar/{}?d=404", c.id.simple()),
    })
}

fn event_json(e: &Event, customer: Option<&Customer>) -> Value {
    json!({
        "id": e.id, "timestamp": e.timestamp, "organization_id": e.organization_id,
        "customer_id": e.customer_id, "customer": customer.map(customer_json),
        "external_customer_id": e.external_customer_id, "member_id": null, "external_member_id": null,
        "child_count": 0, "parent_id": null, "label": e.name, "name": e.name, "source": "user",
        "metadata": e.metadata,
    })
}

fn list_events(store: &Shared, org: uuid::Uuid, query: &str) -> Resp {
    let q = query_pairs(query);
    let mut errors = Vec::new();
    let mut start = None;
    let mut end = None;
    let (mut page, mut limit, mut desc) = (1usize, 10usize, true);
    let (mut ext_ids, mut names, mut sources) = (Vec::new(), Vec::new(), Vec::new());
    let mut meta: Vec<(String, String)> = Vec::new();
    for (k, v) in &q {
        match k.as_str() {
            "start_timestamp" | "end_timestamp" => match chrono::DateTime::parse_from_rfc3339(v) {
                Ok(t) if k == "start_timestamp" => start = Some(t.to_utc()),
                Ok(t) => end = Some(t.to_utc()),
                Err(_) => errors.push(json!({"type": "datetime_from_date_parsing", "loc": ["query", k], "msg": "Input should be a valid datetime", "input": v})),
            },
            "page" => match v.parse::<usize>() {
                Ok(p) if p > 0 => page = p,
                _ => errors.push(json!({"type": "greater_than", "loc": ["query", "page"], "msg": "Input should be greater than 0", "input": v})),
            },
            "limit" => match v.parse::<usize>() {
                Ok(l) if l > 0 => limit = l.min(100), // clamped, never rejected
                _ => errors.push(json!({"type": "greater_than", "loc": ["query", "limit"], "msg": "Input should be greater than 0", "input": v})),
            },
            "sorting" => desc = v.starts_with('-'),
            "external_customer_id" => ext_ids.push(v.clone()),
            "name" => names.push(v.clone()),
            "source" => sources.push(v.clone()),
            k if k.starts_with("metadata[") && k.ends_with(']') => meta.push((k[9..k.len() - 1].to_string(), v.clone())),
            _ => {}
        }
    }
    if !errors.is_empty() {
        return validation("RequestValidationError", errors);
    }
    let s = store.lock().unwrap();
    let empty = Default::default();
    let o = s.orgs.get(&org).unwrap_or(&empty);
    let now = Instant::now();
    let meta_match = |e: &Event| {
        // Repeated values of one key OR together; different keys AND.
        let keys: std::collections::BTreeSet<&String> = meta.iter().map(|(k, _)| k).collect();
        keys.into_iter().all(|k| {
            let want: Vec<&String> = meta
                .iter()
                .filter(|(mk, _)| mk == k)
                .map(|(_, v)| v)
                .collect();
            e.metadata.get(k).is_some_and(|got| {
                let got = match got {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                want.iter().any(|w| **w == got)
            })
        })
    };
    let mut hits: Vec<&Event> = o
        .events
        .iter()
        .filter(|e| e.visible_at <= now)
        .filter(|e| start.is_none_or(|t| e.timestamp > t) && end.is_none_or(|t| e.timestamp < t))
        .filter(|e| {
            ext_ids.is_empty()
                || e.external_customer_id
                    .as_ref()
                    .is_some_and(|x| ext_ids.contains(x))
        })
        .filter(|e| names.is_empty() || names.contains(&e.name))
        .filter(|_| sources.is_empty() || sources.iter().any(|s| s == "user"))
        .filter(|e| meta_match(e))
        .collect();
    hits.sort_by_key(|e| e.timestamp);
    if desc {
        hits.reverse();
    }
    let total = hits.len();
    let items: Vec<Value> = hits
        .iter()
        .skip((page - 1).saturating_mul(limit))
        .take(limit)
        .map(|e| {
            let c = e
                .external_customer_id
                .as_deref()
                .and_then(|x| s.customer_by_external(org, x));
            event_json(e, c)
        })
        .collect();
    json_resp(
        StatusCode::OK,
        &json!({"items": items, "pagination": {"total_count": total, "max_page": total.div_ceil(limit)}}),
    )
}

async fn create_customer(store: &Shared, org: uuid::Uuid, req: Request<Incoming>) -> Resp {
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let v = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("individual")
        .to_string();
    let field = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let (email, external_id, name) = (field("email"), field("external_id"), field("name"));
    let mut schema_errors = Vec::new();
    if kind != "individual" && kind != "team" {
        schema_errors.push(json!({"type": "union_tag_invalid", "loc": ["body"], "msg": "Input tag does not match any of the expected tags: 'individual', 'team'", "input": kind}));
    }
    if kind == "individual" && email.is_none() {
        schema_errors.push(json!({"type": "missing", "loc": ["body", "individual", "email"], "msg": "Field required", "input": v}));
    }
    if kind == "team" && email.is_none() && v.get("owner").is_none_or(Value::is_null) {
        schema_errors.push(json!({"type": "value_error", "loc": ["body", "team"], "msg": "Value error, owner is required when email is not set.", "input": v}));
    }
    if let Some(owner) = v.get("owner").filter(|o| !o.is_null()) {
        if owner
            .get("email")
            .and_then(Value::as_str)
            .is_none_or(|e| !e.contains('@'))
        {
            schema_errors.push(json!({"type": "missing", "loc": ["body", kind, "owner", "email"], "msg": "Field required", "input": owner}));
        }
    }
    if name.as_ref().is_some_and(|n| n.chars().count() > 256) {
        schema_errors.push(json!({"type": "string_too_long", "loc": ["body", kind, "name"], "msg": "String should have at most 256 characters", "input": name}));
    }
    if v.get("organization_id").is_some_and(|o| !o.is_null()) {
        schema_errors.push(json!({"type": "organization_token", "loc": ["body", "organization_id"], "msg": "Setting organization_id is disallowed when using an organization token.", "input": v["organization_id"]}));
    }
    if !schema_errors.is_empty() {
        return validation("RequestValidationError", schema_errors);
    }
    let mut s = store.lock().unwrap();
    let o = s.orgs.entry(org).or_default();
    let mut errors = Vec::new();
    if let Some(e) = &email {
        if o.customers
            .iter()
            .any(|c| c.email.as_ref().is_some_and(|x| x.eq_ignore_ascii_case(e)))
        {
            errors.push(json!({"type": "value_error", "loc": ["body", "email"], "msg": "A customer with this email address already exists.", "input": e}));
        }
    }
    if let Some(x) = &external_id {
        if o.customers
            .iter()
            .any(|c| c.external_id.as_ref() == Some(x))
        {
            errors.push(json!({"type": "value_error", "loc": ["body", "external_id"], "msg": "A customer with this external ID already exists.", "input": x}));
        }
    }
    if !errors.is_empty() {
        return validation("PolarRequestValidationError", errors);
    }
    let c = Customer {
        id: uuid::Uuid::new_v4(),
        organization_id: org,
        created_at: Utc::now(),
        modified_at: None,
        external_id,
        email,
        name,
        kind,
        metadata: v
            .get("metadata")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_else(Map::new),
    };
    let out = customer_json(&c);
    o.customers.push(c);
    json_resp(StatusCode::CREATED, &out)
}

async fn update_customer(
    store: &Shared,
    org: uuid::Uuid,
    req: Request<Incoming>,
    id: &str,
) -> Resp {
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let v = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut s = store.lock().unwrap();
    let Some(o) = s.orgs.get_mut(&org) else {
        return not_found();
    };
    let Some(c) = o.customers.iter_mut().find(|c| c.id.to_string() == id) else {
        return not_found();
    };
    if let Some(x) = v.get("external_id").and_then(Value::as_str) {
        if c.external_id.as_deref().is_some_and(|cur| cur != x) {
            return validation(
                "PolarRequestValidationError",
                vec![
                    json!({"type": "value_error", "loc": ["body", "external_id"], "msg": "Customer external ID cannot be updated.", "input": x}),
                ],
            );
        }
        c.external_id = Some(x.to_string());
    }
    if let Some(n) = v.get("name").and_then(Value::as_str) {
        c.name = Some(n.to_string());
    }
    c.modified_at = Some(Utc::now());
    if let Some(e) = v.get("email").and_then(Value::as_str) {
        let me = c.id;
        let taken = o
            .customers
            .iter()
            .any(|x| x.id != me && x.email.as_ref().is_some_and(|m| m.eq_ignore_ascii_case(e)));
        if taken {
            return validation(
                "PolarRequestValidationError",
                vec![
                    json!({"type": "value_error", "loc": ["body", "email"], "msg": "A customer with this email address already exists.", "input": e}),
                ],
            );
        }
        let c = o
            .customers
            .iter_mut()
            .find(|c| c.id == me)
            .expect("found above");
        c.email = Some(e.to_string());
        return json_resp(StatusCode::OK, &customer_json(c));
    }
    let out = customer_json(c);
    json_resp(StatusCode::OK, &out)
}

// ---- /__admin --------------------------------------------------------------

async fn admin(store: &Shared, req: Request<Incoming>, path: &str) -> Outcome {
    let method = req.method().clone();
    let r = match (&method, path) {
        (&Method::GET, "/__admin/events") => {
            let s = store.lock().unwrap();
            let mut all: Vec<Value> = Vec::new();
            for o in s.orgs.values() {
                for e in &o.events {
                    all.push(json!({
                        "id": e.id, "organization_id": e.organization_id, "name": e.name, "timestamp": e.timestamp,
                        "ingested_at": e.ingested_at, "external_customer_id": e.external_customer_id,
                        "external_id": e.external_id, "metadata": e.metadata,
                    }));
                }
            }
            json_resp(
                StatusCode::OK,
                &json!({"events": all, "ingest_requests": s.ingest_requests, "duplicates": s.duplicates_seen}),
            )
        }
        (&Method::GET, "/__admin/customers") => {
            let s = store.lock().unwrap();
            let all: Vec<Value> = s
                .orgs
                .values()
                .flat_map(|o| o.customers.iter().map(customer_json))
                .collect();
            json_resp(StatusCode::OK, &json!({"customers": all}))
        }
        (&Method::GET, "/__admin/stats") => {
            let s = store.lock().unwrap();
            json_resp(
                StatusCode::OK,
                &json!({"requests": s.stats, "faults": s.faults, "unacknowledged_inserts": s.unacknowledged_inserts,
                        "events": s.orgs.values().map(|o| o.events.len()).sum::<usize>(),
                        "ingest_requests": s.ingest_requests, "duplicates": s.duplicates_seen}),
            )
        }
        (&Method::POST, "/__admin/faults") => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            match serde_json::from_slice::<Faults>(&body) {
                Ok(f) => {
                    store.lock().unwrap().faults = f.clone();
                    json_resp(StatusCode::OK, &json!(f))
                }
                Err(e) => json_resp(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()})),
            }
        }
        (&Method::POST, "/__admin/customers") => {
            // Seed a customer as if created at Polar by someone else.
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            let mut s = store.lock().unwrap();
            let org = s.tokens.values().next().unwrap().org;
            let c = Customer {
                id: uuid::Uuid::new_v4(),
                organization_id: org,
                created_at: Utc::now(),
                modified_at: None,
                external_id: v["external_id"].as_str().map(str::to_string),
                email: v["email"].as_str().map(str::to_string),
                name: v["name"].as_str().map(str::to_string),
                kind: "team".into(),
                metadata: Map::new(),
            };
            let out = customer_json(&c);
            s.orgs.entry(org).or_default().customers.push(c);
            json_resp(StatusCode::CREATED, &out)
        }
        (&Method::DELETE, "/__admin/events") => {
            // ?every=N forgets every Nth event of each organization (a day
            // with gaps, for reconciliation at scale), naming what it forgot.
            let every = query_pairs(req.uri().query().unwrap_or(""))
                .into_iter()
                .find(|(k, _)| k == "every")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .filter(|n| *n > 0);
            let Some(every) = every else {
                return Outcome::Respond(json_resp(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "every must be a positive integer"}),
                ));
            };
            let mut s = store.lock().unwrap();
            let mut forgotten: Vec<Value> = Vec::new();
            for o in s.orgs.values_mut() {
                let mut i = 0;
                o.events.retain(|e| {
                    i += 1;
                    let keep = i % every != 0;
                    if !keep {
                        forgotten.push(
                            e.metadata
                                .get("meter_event_id")
                                .cloned()
                                .unwrap_or(Value::Null),
                        );
                    }
                    keep
                });
            }
            json_resp(
                StatusCode::OK,
                &json!({"removed": forgotten.len(), "meter_event_ids": forgotten}),
            )
        }
        (&Method::DELETE, p) if p.starts_with("/__admin/events/") => {
            let id = &p["/__admin/events/".len()..];
            let mut s = store.lock().unwrap();
            let mut removed = 0;
            for o in s.orgs.values_mut() {
                let before = o.events.len();
                o.events
                    .retain(|e| e.id.to_string() != id && e.external_id.as_deref() != Some(id));
                removed += before - o.events.len();
            }
            json_resp(StatusCode::OK, &json!({"removed": removed}))
        }
        (&Method::POST, "/__admin/reset") => {
            let mut s = store.lock().unwrap();
            for o in s.orgs.values_mut() {
                *o = Default::default();
            }
            s.faults = Faults::default();
            s.stats.clear();
            s.ingest_requests = 0;
            s.duplicates_seen = 0;
            s.unacknowledged_inserts = 0;
            json_resp(StatusCode::OK, &json!({"reset": true}))
        }
        _ => not_found(),
    };
    Outcome::Respond(r)
}
