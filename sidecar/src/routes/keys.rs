//! API keys over HTTP: a key makes, lists and revokes the keys of its own
//! organization (the extension judges every right).
use hyper::body::Incoming;
use hyper::header::{HeaderValue, LOCATION};
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{bearer, json_response, read_json};
use super::{db_problem, App, Handled};
use crate::problem::Problem;
use crate::store::keys;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeyBody {
    name: String,
    #[serde(default)]
    permissions: Option<Vec<String>>,
    #[serde(default)]
    expires_at: Option<String>,
}

pub(super) async fn create_key(app: &App, req: Request<Incoming>) -> Handled {
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
    let made = keys::create_own_api_key(
        &app.pools.requests,
        &key,
        &body.name,
        body.permissions.as_deref(),
        expires_at,
    )
    .await
    .map_err(|e| db_problem(&e))?;
    let id = made.id;
    tracing::info!(key_id = %id, start = made.start, "api key created over HTTP");
    let mut resp = json_response(
        StatusCode::CREATED,
        &json!({
            "id": id,
            "key": made.key,
            "start": made.start,
            "name": body.name,
            "permissions": made.granted,
            "expires_at": made.valid_until,
        }),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/api-keys/{id}")) {
        resp.headers_mut().insert(LOCATION, v);
    }
    Ok(resp)
}

pub(super) async fn list_keys(app: &App, req: Request<Incoming>) -> Handled {
    let key = bearer(req.headers())?;
    let listed = keys::list_own_api_keys(&app.pools.requests, &key)
        .await
        .map_err(|e| db_problem(&e))?;
    let data: Vec<Value> = listed
        .iter()
        .map(|k| {
            json!({
                "id": k.id,
                "name": k.name,
                "start": k.start,
                "permissions": k.permissions,
                "created_at": k.created_at,
                "expires_at": k.expires_at,
                "revoked_at": k.revoked_at,
                "last_used_at": k.last_used_at,
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({ "data": data })))
}

pub(super) async fn revoke_key(app: &App, req: Request<Incoming>, id: &str) -> Handled {
    let key = bearer(req.headers())?;
    // Not a UUID: no key can have that id.
    let id: uuid::Uuid = id.parse().map_err(|_| Problem::not_found())?;
    let revoked_at = keys::revoke_own_api_key(&app.pools.requests, &key, id)
        .await
        .map_err(|e| db_problem(&e))?;
    tracing::info!(key_id = %id, "api key revoked over HTTP");
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": id, "revoked_at": revoked_at}),
    ))
}
