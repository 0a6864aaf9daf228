//! What handlers read from a request (the bearer token, a JSON body within
//! its budget and deadline, with unique keys) and how they answer JSON.
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE,
};
use hyper::{Request, Response, StatusCode};
use polar_meter_rules::batch;
use polar_meter_rules::sqlstate::{self, Violation};
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::time::Duration;

use super::{App, Resp, REQUEST_ID};
use crate::http::budget::{self, ConnectionBudget};
use crate::problem::Problem;

/// The bearer token, unchecked: its format, existence and rights are the
/// extension's to judge. Never logged.
pub(super) fn bearer(h: &HeaderMap) -> Result<String, Problem> {
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

pub(super) fn is_json(h: &HeaderMap) -> bool {
    let Some(ct) = h.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = ct.split(';').next().unwrap_or("").trim();
    mime.eq_ignore_ascii_case("application/json")
}

/// Reads and parses a JSON body: 415 unless JSON, 413 past `limit`, 408 past
/// the body deadline (read_body), 400 with the offending field's path.
pub(super) async fn read_json<T: for<'de> Deserialize<'de>>(
    app: &App,
    req: Request<Incoming>,
    limit: usize,
) -> Result<T, Problem> {
    let body = read_body(app, req, limit).await?;
    parse_json(&body.bytes)
}

/// A body as read, and its share of the body budget: held until the body
/// is dropped, which its reader does once it is parsed (the parsed copy is
/// the one that lives on).
pub(super) struct Body {
    pub(super) bytes: Vec<u8>,
    _held: budget::Held,
}

/// Parses a JSON body; 400 naming the offending field's path.
pub(super) fn parse_json<T: for<'de> Deserialize<'de>>(buf: &[u8]) -> Result<T, Problem> {
    let de = &mut serde_json::Deserializer::from_slice(buf);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            Problem::malformed_body(format!("body is not valid: {inner}"))
        } else {
            Problem::malformed_body(format!("{path}: {inner}"))
        }
    })
}

/// Reads a JSON body whole: 415 unless JSON, 413 past `limit` (checked
/// against Content-Length up front and enforced while reading), 408 past the
/// body deadline. The bytes count against the connection's body budget
/// until the Body is dropped.
pub(super) async fn read_body(
    app: &App,
    req: Request<Incoming>,
    limit: usize,
) -> Result<Body, Problem> {
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
    Ok(Body {
        bytes: buf,
        _held: held,
    })
}

/// Reads and drops what is left of a refused body, so that a client still
/// writing it reads our answer rather than a reset connection (a "lingering
/// close", as nginx does). Bounded in bytes and time: past either, hyper
/// closes the connection after the answer.
pub(super) async fn discard_rest(mut body: Incoming) {
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

/// One event as its client sent it, with unique keys: a key found twice is
/// the event's own violation, named by its dotted path
/// (polar_meter_rules::batch::duplicate_key), never its batch's.
pub(super) fn event(raw: &str) -> Result<Value, Violation> {
    let twice = RefCell::new(None);
    let seed = Strict {
        at: None,
        twice: Some(&twice),
    };
    let v = seed
        .deserialize(&mut serde_json::Deserializer::from_str(raw))
        .map_err(|e| {
            Violation::new(
                sqlstate::EVENT_SHAPE,
                format!("the event is not valid JSON: {e}"),
            )
        })?;
    match twice.into_inner() {
        Some(field) => Err(batch::duplicate_key(&field)),
        None => Ok(v),
    }
}

/// Where a value sits: its key, and its parent's place (built on the stack
/// while parsing; a path is written out only for a key found twice).
struct At<'a> {
    key: &'a str,
    up: Option<&'a At<'a>>,
}

impl At<'_> {
    fn dotted(&self) -> String {
        match self.up {
            Some(up) => format!("{}.{}", up.dotted(), self.key),
            None => self.key.to_string(),
        }
    }
}

/// The parsing seed: where it is, and where to note the first key found
/// twice (None: a key found twice fails the parse).
#[derive(Clone, Copy, Default)]
struct Strict<'a> {
    at: Option<&'a At<'a>>,
    twice: Option<&'a RefCell<Option<String>>>,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
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
        while let Some(v) = s.next_element_seed(self)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = m.next_key::<String>()? {
            let here = At {
                key: &k,
                up: self.at,
            };
            let v = m.next_value_seed(Strict {
                at: Some(&here),
                twice: self.twice,
            })?;
            if out.contains_key(&k) {
                match self.twice {
                    None => return Err(serde::de::Error::custom(format!("duplicate key {k:?}"))),
                    Some(t) => {
                        t.borrow_mut().get_or_insert_with(|| here.dotted());
                        continue;
                    }
                }
            }
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

pub(super) fn json_response(status: StatusCode, v: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The client's X-Request-Id when it is short and plain, else a fresh one.
pub(super) fn request_id(h: &HeaderMap) -> String {
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

/// A fixed JSON document, cacheable.
pub(super) fn static_json(body: Bytes, cache: &'static str) -> Resp {
    let mut r = Response::new(Full::new(body));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static(cache));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderName;

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
    fn an_event_with_a_key_found_twice_is_refused_naming_the_field_and_numbers_stay_exact() {
        let v =
            event(r#"{"event_name":"a","metadata":{"b":123456789012345678901234567890}}"#).unwrap();
        assert_eq!(
            v["metadata"]["b"].to_string(),
            "123456789012345678901234567890"
        );
        for (raw, code, field) in [
            (
                r#"{"event_name":"a","event_name":"b"}"#,
                sqlstate::EVENT_NAME,
                "event_name",
            ),
            (
                r#"{"metadata":{"k":1,"k":1}}"#,
                sqlstate::EVENT_METADATA,
                "metadata.k",
            ),
            (
                r#"{"metadata":{"a":{"x":1,"x":2}}}"#,
                sqlstate::EVENT_METADATA,
                "metadata.a.x",
            ),
            (
                r#"{"colour":1,"colour":2}"#,
                sqlstate::EVENT_SHAPE,
                "colour",
            ),
        ] {
            let e = event(raw).unwrap_err();
            assert_eq!(e.sqlstate, code, "{raw}");
            assert!(
                e.message.starts_with(&format!("{field} appears twice")),
                "{raw}: {}",
                e.message
            );
        }
        // The first key found twice is the one named.
        let e =
            event(r#"{"metadata":{"k":1,"k":2},"event_name":"a","event_name":"a"}"#).unwrap_err();
        assert!(e.message.starts_with("metadata.k"), "{}", e.message);
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
