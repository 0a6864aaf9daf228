//! RFC 9457 problem details. Each cause has a stable `type`. Database errors
//! map through the extension's own error table (polar_meter_rules::sqlstate),
//! the one place that says which SQLSTATE is which HTTP answer.
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use polar_meter_rules::sqlstate;
use serde_json::{json, Value};

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
        Self::new(
            StatusCode::UNAUTHORIZED,
            "missing-credentials",
            "Authentication required",
            "send Authorization: Bearer ak_...",
        )
    }
    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "no such resource",
        )
    }
    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut p = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            format!("allowed: {allow}"),
        );
        p.allow = Some(allow);
        p
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
            format!("the body must be at most {limit} bytes"),
        )
    }
    pub fn body_timeout(secs: u64) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "body-timeout",
            "Request body too slow",
            format!("the body must arrive within {secs} s"),
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
    pub fn overloaded() -> Self {
        let mut p = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Too many requests in progress",
            "the event was not recorded; retry with the same Idempotency-Key",
        );
        p.retry_after = Some(1);
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

    /// The problem for a SQLSTATE raised while serving a client: a declared
    /// code maps to its cause; a `PM` code this binary does not know (a newer
    /// extension during a rolling upgrade) is still the client's, a 400; data
    /// PostgreSQL itself refused (class 22, or too long for an index) is the
    /// client's too. Anything else is ours: a 500.
    pub fn from_sql(code: &str, message: &str) -> Self {
        if let Some(c) = sqlstate::lookup(code) {
            let status = StatusCode::from_u16(c.http_status).unwrap_or(StatusCode::BAD_REQUEST);
            return Self::new(status, c.problem, c.title, message);
        }
        if code.starts_with("PM") {
            return Self::new(
                StatusCode::BAD_REQUEST,
                "request-refused",
                "Request refused",
                format!("{code}: {message}"),
            );
        }
        if code.starts_with("22") || code == "54000" {
            return Self::new(
                StatusCode::BAD_REQUEST,
                "invalid-input",
                "Invalid input",
                "the input holds a value PostgreSQL cannot store or read (for example a NUL character or an out-of-range date)",
            );
        }
        tracing::error!(
            sqlstate = code,
            error = message,
            "the database raised an error this service does not expect"
        );
        Self::internal()
    }

    pub fn from_db(e: &DbError) -> Self {
        match e {
            DbError::Unavailable(_) => Self::unavailable(),
            DbError::Internal(_) => Self::internal(),
            DbError::Sql { code, message } => Self::from_sql(code, message),
        }
    }

    pub fn type_uri(&self) -> String {
        format!("{TYPE_BASE}{}", self.slug)
    }

    /// The RFC 9457 object (also the `problem` of a batch item).
    pub fn body(&self) -> Value {
        json!({
            "type": self.type_uri(),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        })
    }

    /// RFC 6750's `error` for WWW-Authenticate.
    fn auth_error(&self) -> Option<&'static str> {
        match (self.status, self.slug) {
            (StatusCode::UNAUTHORIZED, "missing-credentials") => None,
            (StatusCode::UNAUTHORIZED, _) => Some("invalid_token"),
            (StatusCode::FORBIDDEN, _) => Some("insufficient_scope"),
            _ => None,
        }
    }

    pub fn into_response(self, request_id: &str) -> Response<Full<Bytes>> {
        let mut body = self.body();
        body["request_id"] = json!(request_id);
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
        match (self.status, self.auth_error()) {
            (_, Some(err)) => {
                let v = format!("Bearer realm=\"polar-meter\", error=\"{err}\"");
                h.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_str(&v).expect("static ascii"),
                );
            }
            (StatusCode::UNAUTHORIZED, None) => {
                h.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"polar-meter\""),
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

    #[test]
    fn every_declared_code_answers_as_the_table_says() {
        for c in sqlstate::ALL {
            let p = Problem::from_sql(c.code, "m");
            assert_eq!(p.status.as_u16(), c.http_status, "{}", c.code);
            assert_eq!(p.slug, c.problem, "{}", c.code);
            assert_eq!(p.detail, "m");
        }
        assert_eq!(
            Problem::from_sql("PM020", "m").status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }

    #[test]
    fn client_input_is_never_a_500_and_our_errors_are() {
        for c in [
            "22021", "22P05", "22P02", "22009", "22008", "54000", "PM999", "PM015",
        ] {
            let p = Problem::from_sql(c, "m");
            assert!(p.status.is_client_error(), "{c}: {}", p.status);
        }
        assert_eq!(Problem::from_sql("PM999", "x").slug, "request-refused");
        assert_eq!(
            Problem::from_sql("XX000", "x").status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            Problem::from_sql("42883", "x").status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            Problem::from_db(&DbError::Unavailable("x".into())).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn responses_carry_the_rfc9457_shape_and_headers() {
        let r = Problem::from_sql("PM003", "m").into_response("rid");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/problem+json");
        assert!(r.headers()[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("invalid_token"));
        let r = Problem::from_sql("PM005", "m").into_response("rid");
        assert!(r.headers()[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("insufficient_scope"));
        let r = Problem::missing_credentials().into_response("rid");
        assert_eq!(
            r.headers()[WWW_AUTHENTICATE],
            "Bearer realm=\"polar-meter\""
        );
        let r = Problem::unavailable().into_response("rid");
        assert_eq!(r.headers()[RETRY_AFTER], "2");
    }
}
