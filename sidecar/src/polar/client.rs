//! The Polar API client: ingest, customers, the events list. Every answer is
//! classified once, here: accepted, refused per event (422), rate limited
//! (429), or failed, and a failure is either systemic (Polar as a whole cannot
//! be used: token refused, unreachable, not Polar) or transient (this call:
//! a 5xx or a timeout, which the breaker judges). No redirect is followed and
//! no body is read past a bound.
use serde_json::{json, Value};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::metrics::Metrics;

/// The API version every request pins. Kept equal to the one in
/// crate::LONG_VERSION (a unit test checks).
pub const POLAR_VERSION: &str = "2026-04";

/// Largest answer read from Polar: a page of 100 events with their customers
/// is well under it; an ingest answer is two numbers.
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Not about this call's events: nothing sent now can succeed.
    Systemic(String),
    /// This call failed; whether Polar as a whole is failing, the breaker decides.
    Transient(String),
    /// Polar's answer passed the bytes we read of one (a page of events whose
    /// metadata is large): ask for less at a time.
    TooLarge(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Systemic(m) | Failure::Transient(m) | Failure::TooLarge(m) => f.write_str(m),
        }
    }
}

#[derive(Debug)]
pub enum Answer<T> {
    Ok(T),
    RateLimited(Duration),
    Failed(Failure),
}

#[derive(Debug)]
pub enum Ingest {
    Accepted {
        inserted: u64,
        duplicates: u64,
    },
    /// A 422: nothing from the batch was stored. `refused` are the events
    /// Polar named in `detail[].loc`, with its message; empty when it named none.
    Invalid {
        refused: Vec<(usize, String)>,
        message: String,
    },
    RateLimited(Duration),
    Failed(Failure),
}

pub struct Page {
    pub items: Vec<crate::store::reconcile::Listed>,
    pub total_count: u64,
    pub max_page: u64,
}

/// What to list or count: a window (exclusive bounds, as Polar's), optionally
/// one customer and one event name.
pub struct EventQuery<'a> {
    pub start: &'a str,
    pub end: &'a str,
    pub customer: Option<&'a str>,
    pub name: Option<&'a str>,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: RwLock<Arc<str>>,
    metrics: Arc<Metrics>,
}

/// `POLAR_API_URL` must be https, unless its host is loopback or plain http
/// was allowed explicitly (an emulator on a private network).
pub fn check_base_url(url: &str, allow_insecure: bool) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("POLAR_API_URL: {e}"))?;
    let loopback = match u.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match u.scheme() {
        "https" => Ok(()),
        "http" if loopback || allow_insecure => Ok(()),
        "http" => Err(format!(
            "POLAR_API_URL {} is plain http on a network host: the Polar token would cross the network in clear \
             (set POLAR_ALLOW_INSECURE_URL=true only for an emulator on a private network)",
            redact(url)
        )),
        other => Err(format!("POLAR_API_URL: scheme {other:?} is not http(s)")),
    }
}

/// A URL fit for a log line: user and password replaced, query dropped.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if !u.username().is_empty() || u.password().is_some() {
                let _ = u.set_username("***");
                let _ = u.set_password(None);
            }
            u.set_query(None);
            u.to_string()
        }
        Err(_) => "(unparseable URL)".into(),
    }
}

fn transport(e: reqwest::Error) -> Failure {
    // Without the URL: it may carry credentials.
    let e = e.without_url();
    if e.is_timeout() {
        Failure::Transient("timeout".into())
    } else if e.is_connect() {
        // DNS, refused, TLS: a property of the deployment, not of an event.
        let why = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        Failure::Systemic(format!("Polar unreachable: connection failed ({why})"))
    } else {
        Failure::Transient(format!("transport: {e}"))
    }
}

fn outcome_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        422 => "422",
        429 => "429",
        500..=599 => "5xx",
        300..=399 => "3xx",
        _ => "4xx",
    }
}

impl Client {
    pub fn new(
        base: String,
        token: String,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            // A redirect would turn a POST into a GET somewhere else, with our token.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("polar-meterd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Client {
            http,
            base,
            token: RwLock::new(token.into()),
            metrics,
        })
    }

    /// The base URL, fit for logs and alerts.
    pub fn base_url(&self) -> String {
        redact(&self.base)
    }

    /// A new token (SIGHUP with POLAR_ACCESS_TOKEN_FILE).
    pub fn set_token(&self, token: String) {
        *self.token.write().unwrap() = token.into();
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let token = self.token.read().unwrap().clone();
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&*token)
            .header("Polar-Version", POLAR_VERSION)
    }

    /// Sends, reads the answer up to the bound, and classifies what is not a
    /// 2xx, 422 or 429 into a failure. Returns (status, body) otherwise.
    async fn call(
        &self,
        endpoint: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<(u16, Value, Option<Duration>), Failure> {
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.polar_call(endpoint, "transport");
                return Err(transport(e));
            }
        };
        let status = resp.status().as_u16();
        self.metrics.polar_call(endpoint, outcome_class(status));
        let retry_after = (status == 429).then(|| retry_after(&resp));
        let body = read_bounded(resp, MAX_ANSWER_BYTES).await?;
        classify(endpoint, status, &body, retry_after)
    }

    /// One cheap authenticated call: the token works and the URL is Polar.
    pub async fn check_token(&self) -> Result<(), Failure> {
        let q = [("limit", "1"), ("source", "user")];
        match self
            .call(
                "GET /v1/events/",
                self.req(reqwest::Method::GET, "/v1/events/").query(&q),
            )
            .await
        {
            Ok((429, ..)) | Ok((200, ..)) => Ok(()),
            Ok((status, v, _)) => Err(Failure::Systemic(format!(
                "token check: HTTP {status}: {}",
                summarize(&v)
            ))),
            Err(f) => Err(f),
        }
    }

    /// POST /v1/events/ingest with a body buffered whole (Polar needs a
    /// Content-Length and refuses chunked uploads): events serialised by
    /// crate::polar::events::encode.
    pub async fn ingest(&self, events: &[&[u8]]) -> Ingest {
        let req = self
            .req(reqwest::Method::POST, "/v1/events/ingest")
            .header("content-type", "application/json")
            .body(super::events::ingest_body(events));
        ingest_answer(self.call("POST /v1/events/ingest", req).await)
    }

    /// Creates the org's team customer; on Polar's "external ID already
    /// exists", finds it instead. Returns the Polar customer id.
    pub async fn create_customer(&self, org: &OrgCustomer<'_>) -> Answer<Result<String, String>> {
        let mut body = json!({"type": "team", "external_id": org.id, "name": org.name});
        if let Some(e) = org.email {
            body["email"] = json!(e);
        }
        if let Some(owner) = org.owner_email {
            let mut o = json!({"email": owner});
            if let Some(n) = org.owner_name {
                o["name"] = json!(n);
            }
            if let Some(x) = org.owner_external_id {
                o["external_id"] = json!(x);
            }
            body["owner"] = o;
        }
        let req = self
            .req(reqwest::Method::POST, "/v1/customers/")
            .json(&body);
        match self.call("POST /v1/customers/", req).await {
            Err(f) => Answer::Failed(f),
            Ok((429, _, wait)) => Answer::RateLimited(wait.unwrap_or(Duration::from_secs(1))),
            Ok((422, v, _)) if external_id_taken(&v) => self.customer_by_external_id(org.id).await,
            Ok((422, v, _)) => Answer::Ok(Err(format!("HTTP 422: {}", summarize(&v)))),
            Ok((_, v, _)) => Answer::Ok(
                v["id"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| "customer without id".into()),
            ),
        }
    }

    pub async fn customer_by_external_id(&self, org_id: &str) -> Answer<Result<String, String>> {
        let path = format!("/v1/customers/external/{}", encode_path(org_id));
        match self
            .call(
                "GET /v1/customers/external/{id}",
                self.req(reqwest::Method::GET, &path),
            )
            .await
        {
            Err(f) => Answer::Failed(f),
            Ok((429, _, wait)) => Answer::RateLimited(wait.unwrap_or(Duration::from_secs(1))),
            Ok((_, v, _)) => Answer::Ok(
                v["id"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| "customer without id".into()),
            ),
        }
    }

    /// PATCH /v1/customers/{id}: the name and email Polar holds.
    pub async fn update_customer(
        &self,
        customer_id: &str,
        name: &str,
        email: Option<&str>,
    ) -> Answer<Result<(), String>> {
        let path = format!("/v1/customers/{}", encode_path(customer_id));
        let mut body = json!({"name": name});
        if let Some(e) = email {
            body["email"] = json!(e);
        }
        match self
            .call(
                "PATCH /v1/customers/{id}",
                self.req(reqwest::Method::PATCH, &path).json(&body),
            )
            .await
        {
            Err(Failure::Systemic(m)) if m.starts_with("HTTP 404") => Answer::Ok(Err(format!(
                "customer {customer_id} not found at Polar (deleted there?)"
            ))),
            Err(f) => Answer::Failed(f),
            Ok((429, _, wait)) => Answer::RateLimited(wait.unwrap_or(Duration::from_secs(1))),
            Ok((422, v, _)) => Answer::Ok(Err(format!("HTTP 422: {}", summarize(&v)))),
            Ok(_) => Answer::Ok(Ok(())),
        }
    }

    /// One page (1-based) of GET /v1/events/, oldest first. Polar's bounds are
    /// exclusive: the caller passes start minus a microsecond for [start, end).
    pub async fn list_events(&self, q: &EventQuery<'_>, page: u64, limit: u64) -> Answer<Page> {
        let mut query = vec![
            ("start_timestamp", q.start.to_string()),
            ("end_timestamp", q.end.to_string()),
            ("source", "user".to_string()),
            ("sorting", "timestamp".to_string()),
            ("page", page.to_string()),
            ("limit", limit.to_string()),
        ];
        if let Some(c) = q.customer {
            query.push(("external_customer_id", c.to_string()));
        }
        if let Some(n) = q.name {
            query.push(("name", n.to_string()));
        }
        let req = self.req(reqwest::Method::GET, "/v1/events/").query(&query);
        match self.call("GET /v1/events/", req).await {
            Err(f) => Answer::Failed(f),
            Ok((429, _, wait)) => Answer::RateLimited(wait.unwrap_or(Duration::from_secs(1))),
            Ok((422, v, _)) => Answer::Failed(Failure::Transient(format!(
                "list: HTTP 422: {}",
                summarize(&v)
            ))),
            Ok((_, v, _)) => match (
                v["items"].as_array(),
                v["pagination"]["total_count"].as_u64(),
            ) {
                (Some(items), Some(total_count)) => {
                    match items.iter().map(super::events::listed).collect() {
                        Ok(items) => Answer::Ok(Page {
                            items,
                            total_count,
                            max_page: v["pagination"]["max_page"].as_u64().unwrap_or(0),
                        }),
                        // Polar answered, with something we cannot read:
                        // this try fails, the run is tried again.
                        Err(e) => Answer::Failed(Failure::Transient(e)),
                    }
                }
                _ => Answer::Failed(Failure::Systemic(
                    "Polar's event list has no items or pagination".into(),
                )),
            },
        }
    }

    /// How many events Polar holds for a query (`pagination.total_count` of a 1-item page).
    pub async fn count_events(&self, q: &EventQuery<'_>) -> Answer<u64> {
        match self.list_events(q, 1, 1).await {
            Answer::Ok(p) => Answer::Ok(p.total_count),
            Answer::RateLimited(d) => Answer::RateLimited(d),
            Answer::Failed(f) => Answer::Failed(f),
        }
    }
}

/// What an answer means, apart from the call: a 2xx, 422 or 429 to read
/// (status, JSON, Retry-After), or a failure, systemic or transient.
pub fn classify(
    endpoint: &str,
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<(u16, Value, Option<Duration>), Failure> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    match status {
        429 => Ok((status, Value::Null, retry_after)),
        200..=299 | 422 => match json {
            Some(v) => Ok((status, v, None)),
            None => Err(Failure::Systemic(format!(
                "Polar's API did not answer JSON (HTTP {status}): POLAR_API_URL may not be Polar"
            ))),
        },
        300..=399 => Err(Failure::Systemic(format!(
            "HTTP {status}: Polar's API redirected, and redirects are not followed (check POLAR_API_URL)"
        ))),
        401 | 403 => Err(Failure::Systemic(format!(
            "Polar refused the token: HTTP {status}: {}",
            text()
        ))),
        404 | 405 => Err(Failure::Systemic(format!(
            "HTTP {status} for {endpoint}: POLAR_API_URL does not look like Polar's API"
        ))),
        _ => Err(Failure::Transient(format!("HTTP {status}: {}", text()))),
    }
}

/// What an ingest answer means (classified by `classify` first).
pub fn ingest_answer(answer: Result<(u16, Value, Option<Duration>), Failure>) -> Ingest {
    match answer {
        Err(f) => Ingest::Failed(f),
        Ok((429, _, wait)) => Ingest::RateLimited(wait.unwrap_or(Duration::from_secs(1))),
        Ok((422, v, _)) => Ingest::Invalid {
            refused: refused_events(&v),
            message: format!("HTTP 422: {}", summarize(&v)),
        },
        Ok((_, v, _)) => match (v["inserted"].as_u64(), v["duplicates"].as_u64().or(Some(0))) {
            (Some(inserted), Some(duplicates)) => Ingest::Accepted {
                inserted,
                duplicates,
            },
            _ => Ingest::Failed(Failure::Systemic(
                "Polar's ingest answer has no counts: POLAR_API_URL may not be Polar".into(),
            )),
        },
    }
}

/// What a team customer is made of.
pub struct OrgCustomer<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub email: Option<&'a str>,
    pub owner_email: Option<&'a str>,
    pub owner_name: Option<&'a str>,
    pub owner_external_id: Option<&'a str>,
}

async fn read_bounded(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, Failure> {
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if out.len() + c.len() > limit {
                    return Err(Failure::TooLarge(format!(
                        "Polar's answer exceeds {limit} bytes"
                    )));
                }
                out.extend_from_slice(&c);
            }
            Ok(None) => return Ok(out),
            Err(e) => return Err(transport(e)),
        }
    }
}

fn retry_after(resp: &reqwest::Response) -> Duration {
    let secs = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    Duration::from_secs(secs.unwrap_or(1).clamp(1, 3600))
}

/// Events named by a 422's `detail[].loc` (["body","events",i,...]) with Polar's message.
pub fn refused_events(v: &Value) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = v["detail"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|e| {
                    let loc = e["loc"].as_array()?;
                    let i = (loc.first()? == "body" && loc.get(1)? == "events")
                        .then(|| loc.get(2)?.as_u64())??;
                    Some((i as usize, e["msg"].as_str().unwrap_or("").to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|(i, _)| *i);
    out.dedup_by(|a, b| {
        if a.0 == b.0 && !b.1.contains(&a.1) {
            b.1 = format!("{}; {}", b.1, a.1);
        }
        a.0 == b.0
    });
    out
}

/// Polar refuses a timestamp from its future with this message.
pub fn is_future_timestamp(msg: &str) -> bool {
    msg.contains("must be in the past")
}

fn summarize(v: &Value) -> String {
    let msgs: Vec<String> = v["detail"]
        .as_array()
        .map(|d| {
            d.iter()
                .take(3)
                .map(|e| format!("{}: {}", e["loc"], e["msg"].as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    if msgs.is_empty() {
        v.to_string().chars().take(300).collect()
    } else {
        msgs.join("; ")
    }
}

fn external_id_taken(v: &Value) -> bool {
    v["detail"]
        .as_array()
        .is_some_and(|d| d.iter().any(|e| e["loc"] == json!(["body", "external_id"])))
}

fn encode_path(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_events_come_from_loc_with_their_messages() {
        let v = json!({"detail": [
            {"loc": ["body", "events", 3, "EventCreateExternalCustomer", "timestamp"], "msg": "Value error, Timestamp must be in the past."},
            {"loc": ["body", "events", 1, "customer_id"], "msg": "Customer not found."},
            {"loc": ["body", "events", 3, "EventCreateCustomer", "timestamp"], "msg": "Value error, Timestamp must be in the past."},
            {"loc": ["body", "other"]},
        ]});
        let r = refused_events(&v);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!(is_future_timestamp(&r[1].1));
        assert!(!is_future_timestamp(&r[0].1));
        assert!(refused_events(&json!({"detail": "x"})).is_empty());
    }

    #[test]
    fn the_long_version_names_the_pinned_polar_version() {
        assert!(crate::LONG_VERSION.contains(&format!("Polar-Version {POLAR_VERSION}")));
        assert!(crate::LONG_VERSION.starts_with(crate::VERSION));
    }

    #[test]
    fn base_urls_must_be_https_off_loopback_and_never_log_credentials() {
        assert!(check_base_url("https://api.polar.sh", false).is_ok());
        assert!(check_base_url("http://127.0.0.1:8788", false).is_ok());
        assert!(check_base_url("http://localhost:8788", false).is_ok());
        assert!(check_base_url("http://[::1]:8788", false).is_ok());
        assert!(check_base_url("http://polar-emulator:8788", true).is_ok());
        let e = check_base_url("http://user:hunter2@polar.example", false).unwrap_err();
        assert!(!e.contains("hunter2") && !e.contains("user:"), "{e}");
        assert!(check_base_url("ftp://x", true).is_err());
        assert_eq!(
            redact("https://u:p@h.example/x?token=s"),
            "https://***@h.example/x"
        );
        assert!(!redact("not a url").contains("not a url"));
    }

    #[test]
    fn conflict_detection_and_paths() {
        assert!(external_id_taken(
            &json!({"detail": [{"loc": ["body", "external_id"]}]})
        ));
        assert!(!external_id_taken(
            &json!({"detail": [{"loc": ["body", "email"]}]})
        ));
        assert_eq!(encode_path("a b/c"), "a%20b%2Fc");
    }
}
