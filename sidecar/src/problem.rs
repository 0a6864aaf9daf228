//! RFC 9457 problem details. Each cause has a stable `type`; the SQLSTATE
//! table below is the only place that maps extension errors to HTTP.
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::db::DbError;

pub const TYPE_BASE: &str = "https://polar-meter.dev/problems/";

#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub slug: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// Seconds, for 503.
    pub retry_after: Option<u32>,
    /// The `error` parameter of WWW-Authenticate for 401s.
    pub auth_error: Option<&'static str>,
    /// The Allow header, for 405.
    pub allow: Option<&'static str>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Problem {
            status,
            slug,
            title,
            detail: detail.into(),
            retry_after: None,
            auth_error: None,
            allow: None,
        }
    }

    pub fn malformed_body(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed-body",
            "Malformed request body",
            detail,
        )
    }
    pub fn bad_idempotency_key(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid-idempotency-key",
            "Missing or invalid Idempotency-Key",
            detail,
        )
    }
    pub fn missing_credentials() -> Self {
        let mut p = Self::new(
            StatusCode::UNAUTHORIZED,
            "missing-credentials",
            "Authentication required",
            "send Authorization: Bearer ak_...",
        );
        p.auth_error = Some("");
        p
    }
    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "no such resource",
        )
    }
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            "see the Allow header",
        )
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
            format!("the body must be at most {limit} bytes"),
        )
    }
    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            "send Content-Type: application/json",
        )
    }
    pub fn unavailable() -> Self {
        let mut p = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database-unavailable",
            "Database unavailable",
            "the event was not recorded; retry with the same Idempotency-Key",
        );
        p.retry_after = Some(2);
        p
    }
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "an unexpected error; it has been logged",
        )
    }

    /// The problem for a database failure: an extension SQLSTATE maps to its
    /// cause; input PostgreSQL itself refused (NUL bytes, bad encoding) is the
    /// client's; the database being away is a 503.
    pub fn from_db(e: &DbError) -> Self {
        let (code, message) = match e {
            DbError::Unavailable(_) => return Self::unavailable(),
            DbError::Internal(_) => return Self::internal(),
            DbError::Sql { code, message } => (code.as_str(), message.clone()),
        };
        use StatusCode as S;
        let (status, slug, title, auth) = match code {
            "PM001" => (
                S::UNAUTHORIZED,
                "malformed-api-key",
                "Malformed API key",
                Some("invalid_token"),
            ),
            "PM002" => (
                S::UNAUTHORIZED,
                "unknown-api-key",
                "Unknown API key",
                Some("invalid_token"),
            ),
            "PM003" => (
                S::UNAUTHORIZED,
                "revoked-api-key",
                "Revoked API key",
                Some("invalid_token"),
            ),
            "PM004" => (
                S::UNAUTHORIZED,
                "expired-api-key",
                "Expired API key",
                Some("invalid_token"),
            ),
            "PM005" => (
                S::FORBIDDEN,
                "insufficient-permission",
                "Insufficient permission",
                Some("insufficient_scope"),
            ),
            "PM010" => (
                S::BAD_REQUEST,
                "invalid-event-name",
                "Invalid event_name",
                None,
            ),
            "PM011" => (
                S::BAD_REQUEST,
                "invalid-timestamp",
                "Invalid event_timestamp",
                None,
            ),
            "PM012" => (
                S::BAD_REQUEST,
                "timestamp-in-future",
                "event_timestamp in the future",
                None,
            ),
            "PM013" => (S::BAD_REQUEST, "invalid-metadata", "Invalid metadata", None),
            "PM014" => (
                S::BAD_REQUEST,
                "invalid-idempotency-key",
                "Missing or invalid Idempotency-Key",
                None,
            ),
            "PM020" => (
                S::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency-Key reused with a different payload",
                None,
            ),
            "PM031" => (
                S::BAD_REQUEST,
                "invalid-permissions",
                "Invalid permissions",
                None,
            ),
            "PM032" => (S::BAD_REQUEST, "invalid-key-name", "Invalid key name", None),
            "PM033" => (S::NOT_FOUND, "not-found", "Not found", None),
            "PM034" => (S::BAD_REQUEST, "invalid-argument", "Invalid argument", None),
            // PostgreSQL refused the input before our code saw it: NUL in
            // text (22021), NUL escape in jsonb (22P05), bad text form (22P02),
            // value out of range (22003, 22008), too long for an index (54000).
            "22021" | "22P05" | "22P02" | "22003" | "22008" | "22007" | "54000" => {
                (S::BAD_REQUEST, "invalid-input", "Invalid input", None)
            }
            _ => return Self::internal(),
        };
        let mut p = Self::new(status, slug, title, message);
        if code.starts_with("22") || code == "54000" {
            p.detail =
                "the input contains a value PostgreSQL cannot store (for example a NUL character)"
                    .into();
        }
        p.auth_error = auth;
        p
    }

    pub fn type_uri(&self) -> String {
        format!("{TYPE_BASE}{}", self.slug)
    }

    pub fn into_response(self, request_id: &str) -> Response<Full<Bytes>> {
        let body = json!({
            "type": self.type_uri(),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
            "request_id": request_id,
        });
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(secs) = self.retry_after {
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        match (self.status, self.auth_error) {
            (StatusCode::UNAUTHORIZED, Some("")) | (StatusCode::UNAUTHORIZED, None) => {
                h.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"polar-meter\""),
                );
            }
            (_, Some(err)) => {
                let v = format!("Bearer realm=\"polar-meter\", error=\"{err}\"");
                h.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_str(&v).expect("static ascii"),
                );
            }
            _ => {}
        }
        if let Some(allow) = self.allow {
            h.insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(code: &str) -> DbError {
        DbError::Sql {
            code: code.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn every_extension_code_maps_to_a_distinct_cause() {
        let codes = [
            "PM001", "PM002", "PM003", "PM004", "PM005", "PM010", "PM011", "PM012", "PM013",
            "PM014", "PM020",
        ];
        let slugs: std::collections::HashSet<&str> = codes
            .iter()
            .map(|c| Problem::from_db(&sql(c)).slug)
            .collect();
        assert_eq!(slugs.len(), codes.len());
        assert_eq!(
            Problem::from_db(&sql("PM001")).status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            Problem::from_db(&sql("PM005")).status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            Problem::from_db(&sql("PM020")).status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            Problem::from_db(&sql("PM013")).status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn client_input_is_never_a_500_and_unknown_codes_are() {
        for c in ["22021", "22P05", "22P02", "54000", "PM034"] {
            assert_eq!(
                Problem::from_db(&sql(c)).status,
                StatusCode::BAD_REQUEST,
                "{c}"
            );
        }
        assert_eq!(
            Problem::from_db(&sql("XX000")).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            Problem::from_db(&DbError::Unavailable("x".into())).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn responses_carry_the_rfc9457_shape_and_headers() {
        let r = Problem::from_db(&sql("PM003")).into_response("rid");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/problem+json");
        assert!(r.headers()[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("invalid_token"));
        let r = Problem::unavailable().into_response("rid");
        assert_eq!(r.headers()[RETRY_AFTER], "2");
    }
}
