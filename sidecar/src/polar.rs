//! The Polar API client: ingest, customers, the events list. One rate limiter
//! is shared by every Polar call of this process and honours Retry-After.
use serde_json::{json, Value};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The API version every request pins (POLAR-API.md §4). Kept equal to the
/// one in crate::LONG_VERSION (a unit test checks).
pub const POLAR_VERSION: &str = "2026-04";

/// Spaces calls evenly at `per_minute`, and waits out a Retry-After for all.
/// Even spacing (no burst) keeps us under Polar's per-minute window however
/// long a backlog lasts.
pub struct Limiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl Limiter {
    pub fn new(per_minute: u32) -> Self {
        let per_minute = per_minute.max(1);
        Limiter {
            interval: Duration::from_secs(60) / per_minute,
            next: Mutex::new(Instant::now()),
        }
    }

    /// Reserves the next slot and waits for it.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap();
            let slot = (*next).max(Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }

    /// No call before `wait` from now (a 429's Retry-After).
    pub fn pause(&self, wait: Duration) {
        let mut next = self.next.lock().unwrap();
        *next = (*next).max(Instant::now() + wait);
    }
}

#[derive(Debug)]
pub enum Ingest {
    Accepted {
        inserted: u64,
        duplicates: u64,
    },
    RateLimited(Duration),
    /// A 422: nothing from the batch was stored. `indexes` are the events
    /// Polar named in `detail[].loc`; empty when it named none.
    Invalid {
        indexes: Vec<usize>,
        message: String,
    },
    /// Anything to retry later: 5xx, timeout, connection lost, 401/403.
    Failed(String),
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    pub limiter: Limiter,
}

impl Client {
    pub fn new(
        base: String,
        token: String,
        per_minute: u32,
        timeout: Duration,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("polar-meterd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Client {
            http,
            base,
            token,
            limiter: Limiter::new(per_minute),
        })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("Polar-Version", POLAR_VERSION)
    }

    /// POST /v1/events/ingest with a body buffered whole (Polar needs a
    /// Content-Length and refuses chunked uploads).
    pub async fn ingest(&self, events: &[&Value]) -> Ingest {
        self.limiter.acquire().await;
        let body = serde_json::to_vec(&json!({ "events": events })).expect("serialisable");
        let resp = match self
            .req(reqwest::Method::POST, "/v1/events/ingest")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return Ingest::Failed(transport_error(e)),
        };
        let status = resp.status();
        if status.as_u16() == 429 {
            let wait = retry_after(&resp);
            self.limiter.pause(wait);
            return Ingest::RateLimited(wait);
        }
        let text = resp.text().await.unwrap_or_default();
        match status.as_u16() {
            200 => {
                let v: Value = serde_json::from_str(&text).unwrap_or_default();
                Ingest::Accepted {
                    inserted: v["inserted"].as_u64().unwrap_or(0),
                    duplicates: v["duplicates"].as_u64().unwrap_or(0),
                }
            }
            422 => {
                let v: Value = serde_json::from_str(&text).unwrap_or_default();
                Ingest::Invalid {
                    indexes: event_indexes(&v),
                    message: summarize(&v, &text),
                }
            }
            _ => Ingest::Failed(format!("HTTP {status}: {}", truncate(&text, 300))),
        }
    }

    /// Creates the org's team customer, or finds it when Polar says the
    /// external_id is taken (it already exists). Returns the Polar customer id.
    pub async fn ensure_customer(
        &self,
        org_id: &str,
        name: &str,
        email: Option<&str>,
    ) -> Result<String, String> {
        self.limiter.acquire().await;
        let mut body = json!({"type": "team", "external_id": org_id, "name": name});
        if let Some(e) = email {
            body["email"] = json!(e);
        }
        let resp = self
            .req(reqwest::Method::POST, "/v1/customers/")
            .json(&body)
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status().as_u16();
        if status == 429 {
            let wait = retry_after(&resp);
            self.limiter.pause(wait);
            return Err(format!("rate limited for {}s", wait.as_secs()));
        }
        let v: Value = resp.json().await.unwrap_or_default();
        match status {
            201 | 200 => v["id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| "customer without id".into()),
            422 if external_id_taken(&v) => self.customer_by_external_id(org_id).await,
            _ => Err(format!("HTTP {status}: {}", truncate(&v.to_string(), 300))),
        }
    }

    pub async fn customer_by_external_id(&self, org_id: &str) -> Result<String, String> {
        self.limiter.acquire().await;
        let path = format!("/v1/customers/external/{}", encode_path(org_id));
        let resp = self
            .req(reqwest::Method::GET, &path)
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or_default();
        match status {
            200 => v["id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| "customer without id".into()),
            _ => Err(format!("lookup by external_id: HTTP {status}")),
        }
    }
}

/// One page of GET /v1/events/ for a time window, oldest first.
pub enum Page {
    Events { items: Vec<Value>, max_page: u64 },
    RateLimited(Duration),
    Failed(String),
}

impl Client {
    /// Polar's bounds are exclusive (timestamp > start and < end), so the
    /// caller passes start minus a microsecond for a half-open [start, end).
    pub async fn list_events(&self, start: &str, end: &str, page: u64, limit: u64) -> Page {
        self.limiter.acquire().await;
        let query = [
            ("start_timestamp", start.to_string()),
            ("end_timestamp", end.to_string()),
            ("source", "user".to_string()),
            ("sorting", "timestamp".to_string()),
            ("page", page.to_string()),
            ("limit", limit.to_string()),
        ];
        let resp = match self
            .req(reqwest::Method::GET, "/v1/events/")
            .query(&query)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return Page::Failed(transport_error(e)),
        };
        let status = resp.status().as_u16();
        if status == 429 {
            let wait = retry_after(&resp);
            self.limiter.pause(wait);
            return Page::RateLimited(wait);
        }
        if status != 200 {
            return Page::Failed(format!("HTTP {status}"));
        }
        match resp.json::<Value>().await {
            Ok(v) => Page::Events {
                items: v["items"].as_array().cloned().unwrap_or_default(),
                max_page: v["pagination"]["max_page"].as_u64().unwrap_or(0),
            },
            Err(e) => Page::Failed(format!("list body: {}", e.without_url())),
        }
    }
}

/// Reqwest's message without the URL's query (nothing secret is in our URLs,
/// but errors stay short and uniform).
fn transport_error(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        format!("transport: {}", e.without_url())
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

/// Event indexes named by a 422's `detail[].loc` (["body","events",i,...]).
pub fn event_indexes(v: &Value) -> Vec<usize> {
    let mut out: Vec<usize> = v["detail"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|e| {
                    let loc = e["loc"].as_array()?;
                    (loc.first()? == "body" && loc.get(1)? == "events")
                        .then(|| loc.get(2)?.as_u64().map(|i| i as usize))?
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_unstable();
    out.dedup();
    out
}

fn summarize(v: &Value, raw: &str) -> String {
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
        format!("HTTP 422: {}", truncate(raw, 300))
    } else {
        format!("HTTP 422: {}", msgs.join("; "))
    }
}

fn external_id_taken(v: &Value) -> bool {
    v["detail"]
        .as_array()
        .is_some_and(|d| d.iter().any(|e| e["loc"] == json!(["body", "external_id"])))
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
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
    fn indexes_come_from_loc() {
        let v = json!({"detail": [
            {"loc": ["body", "events", 3, "EventCreateExternalCustomer", "name"]},
            {"loc": ["body", "events", 1, "customer_id"]},
            {"loc": ["body", "events", 3, "EventCreateExternalCustomer", "timestamp"]},
            {"loc": ["body", "other"]},
        ]});
        assert_eq!(event_indexes(&v), vec![1, 3]);
        assert!(event_indexes(&json!({"detail": "x"})).is_empty());
    }

    #[test]
    fn the_long_version_names_the_pinned_polar_version() {
        assert!(crate::LONG_VERSION.contains(&format!("Polar-Version {POLAR_VERSION}")));
        assert!(crate::LONG_VERSION.starts_with(crate::VERSION));
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

    #[tokio::test]
    async fn limiter_spaces_calls_and_pauses() {
        let l = Limiter::new(600); // one per 100 ms
        let t = Instant::now();
        for _ in 0..4 {
            l.acquire().await;
        }
        let spent = t.elapsed();
        assert!(spent >= Duration::from_millis(300), "{spent:?}");
        l.pause(Duration::from_millis(300));
        let t = Instant::now();
        l.acquire().await;
        assert!(t.elapsed() >= Duration::from_millis(250));
    }
}
