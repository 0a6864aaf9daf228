//! API keys over HTTP, and the versions /readyz compares.
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use uuid::Uuid;

use super::{col, one, rows, DbError};

const CREATE_OWN_API_KEY: &str = "SELECT id, key, start, granted, valid_until \
     FROM meter.create_own_api_key($1::text, $2::text, $3::text[], $4::timestamptz)";
const LIST_OWN_API_KEYS: &str =
    "SELECT id, name, start, permissions, created_at, expires_at, revoked_at, last_used_at \
     FROM meter.list_own_api_keys($1::text)";
const REVOKE_OWN_API_KEY: &str =
    "SELECT meter.revoke_own_api_key($1::text, $2::uuid) AS revoked_at";
const VERSIONS: &str = "SELECT meter.extension_version() AS installed, \
     meter.oldest_supported_sidecar() AS oldest_sidecar";

/// A key just made: the secret, shown once.
pub struct CreatedKey {
    pub id: Uuid,
    pub key: String,
    pub start: String,
    pub granted: Vec<String>,
    pub valid_until: Option<DateTime<Utc>>,
}

pub struct KeyInfo {
    pub id: Uuid,
    pub name: String,
    pub start: String,
    pub permissions: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

pub struct Versions {
    /// The extension's version as installed (NULL: not installed).
    pub installed: Option<String>,
    /// The oldest polar-meterd the installed extension still serves.
    pub oldest_sidecar: String,
}

pub async fn create_own_api_key(
    pool: &Pool,
    key: &str,
    name: &str,
    permissions: Option<&[String]>,
    expires_at: Option<DateTime<Utc>>,
) -> Result<CreatedKey, DbError> {
    let r = one(
        pool,
        CREATE_OWN_API_KEY,
        &[&key, &name, &permissions, &expires_at],
    )
    .await?;
    Ok(CreatedKey {
        id: col(&r, "id")?,
        key: col(&r, "key")?,
        start: col(&r, "start")?,
        granted: col(&r, "granted")?,
        valid_until: col(&r, "valid_until")?,
    })
}

pub async fn list_own_api_keys(pool: &Pool, key: &str) -> Result<Vec<KeyInfo>, DbError> {
    rows(pool, LIST_OWN_API_KEYS, &[&key])
        .await?
        .iter()
        .map(|r| {
            Ok(KeyInfo {
                id: col(r, "id")?,
                name: col(r, "name")?,
                start: col(r, "start")?,
                permissions: col(r, "permissions")?,
                created_at: col(r, "created_at")?,
                expires_at: col(r, "expires_at")?,
                revoked_at: col(r, "revoked_at")?,
                last_used_at: col(r, "last_used_at")?,
            })
        })
        .collect()
}

pub async fn revoke_own_api_key(
    pool: &Pool,
    key: &str,
    id: Uuid,
) -> Result<DateTime<Utc>, DbError> {
    col(
        &one(pool, REVOKE_OWN_API_KEY, &[&key, &id]).await?,
        "revoked_at",
    )
}

pub async fn versions(pool: &Pool) -> Result<Versions, DbError> {
    let r = one(pool, VERSIONS, &[]).await?;
    Ok(Versions {
        installed: col(&r, "installed")?,
        oldest_sidecar: col(&r, "oldest_sidecar")?,
    })
}
