//! In-memory state of the emulated Polar: organizations (one per token),
//! events, customers, rate-limit windows and fault settings.
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub id: uuid::Uuid,
    pub organization_id: uuid::Uuid,
    pub name: String,
    pub timestamp: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
    #[serde(skip)]
    pub visible_at: Instant,
    pub external_customer_id: Option<String>,
    pub customer_id: Option<uuid::Uuid>,
    pub external_id: Option<String>,
    pub metadata: serde_json::Map<String, Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Customer {
    pub id: uuid::Uuid,
    pub organization_id: uuid::Uuid,
    pub created_at: DateTime<Utc>,
    pub modified_at: Option<DateTime<Utc>>,
    pub external_id: Option<String>,
    pub email: Option<String>,
    pub name: Option<String>,
    pub kind: String,
    pub metadata: serde_json::Map<String, Value>,
}

/// Probabilities (0..1) of each injected fault, applied to every API call
/// except `/__admin`. `delay_ms` is how long a "timeout" holds the response.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    #[serde(default)]
    pub error_5xx: f64,
    #[serde(default)]
    pub rate_429: f64,
    #[serde(default)]
    pub timeout: f64,
    #[serde(default)]
    pub commit_then_drop: f64,
    #[serde(default)]
    pub delay_ms: u64,
    /// The status of an injected 5xx (default: 500 or 502 at random).
    #[serde(default)]
    pub error_status: Option<u16>,
    /// Answer every API call 401 invalid_token, as Polar does for a revoked token.
    #[serde(default)]
    pub reject_token: bool,
    /// Milliseconds added to the emulator's clock when it judges "in the
    /// future" (negative: Polar's clock is behind ours). Not a fault: always applies.
    #[serde(default)]
    pub clock_offset_ms: i64,
    /// When not empty, faults apply only to calls whose "METHOD path?query"
    /// starts with one of these (e.g. "POST /v1/events/ingest").
    #[serde(default)]
    pub only: Vec<String>,
}

impl Faults {
    pub fn applies(&self, method: &str, path_and_query: &str) -> bool {
        let call = format!("{method} {path_and_query}");
        self.only.is_empty() || self.only.iter().any(|p| call.starts_with(p.as_str()))
    }
}

/// What one organization access token may do.
#[derive(Clone, Debug)]
pub struct Grant {
    pub org: uuid::Uuid,
    /// None: every scope, as a token created with all boxes ticked.
    pub scopes: Option<Vec<String>>,
}

impl Grant {
    /// Whether the token holds at least one of `any_of`.
    pub fn allows(&self, any_of: &[&str]) -> bool {
        self.scopes
            .as_ref()
            .is_none_or(|held| any_of.iter().any(|s| held.iter().any(|h| h == s)))
    }
}

/// Parses `--tokens`: comma-separated `token[=scope+scope...]`, each token
/// its own organization, e.g. `polar_oat_a,polar_oat_b=events:read`.
pub fn parse_tokens(spec: &str) -> HashMap<String, Grant> {
    spec.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let (token, scopes) = match t.split_once('=') {
                Some((token, scopes)) => (
                    token,
                    Some(
                        scopes
                            .split('+')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect(),
                    ),
                ),
                None => (t, None),
            };
            let grant = Grant {
                org: uuid::Uuid::new_v4(),
                scopes,
            };
            (token.to_string(), grant)
        })
        .collect()
}

#[derive(Default)]
pub struct Org {
    pub events: Vec<Event>,
    pub external_ids: HashSet<String>,
    pub customers: Vec<Customer>,
    pub window: VecDeque<Instant>,
}

pub struct Store {
    pub tokens: HashMap<String, Grant>,
    pub orgs: HashMap<uuid::Uuid, Org>,
    pub rate_per_minute: usize,
    pub visibility_delay: Duration,
    pub faults: Faults,
    pub sandbox: bool,
    /// Requests answered, by "METHOD path status", for tests.
    pub stats: HashMap<String, u64>,
    pub ingest_requests: u64,
    pub duplicates_seen: u64,
    /// Events inserted by ingest requests whose response was then dropped:
    /// the client never learned of them, so each must come back as a duplicate.
    pub unacknowledged_inserts: u64,
}

impl Store {
    pub fn new(
        tokens: HashMap<String, Grant>,
        rate_per_minute: usize,
        visibility_delay: Duration,
        sandbox: bool,
    ) -> Self {
        let orgs = tokens.values().map(|g| (g.org, Org::default())).collect();
        Store {
            tokens,
            orgs,
            rate_per_minute,
            visibility_delay,
            faults: Faults::default(),
            sandbox,
            stats: HashMap::new(),
            ingest_requests: 0,
            duplicates_seen: 0,
            unacknowledged_inserts: 0,
        }
    }

    /// Sliding one-minute window per organization: all of an org's tokens
    /// share it, as at Polar. Err(seconds to wait) when the budget is spent.
    pub fn take_rate(&mut self, org: uuid::Uuid) -> Result<(), u64> {
        let limit = self.rate_per_minute;
        let o = self.orgs.entry(org).or_default();
        let now = Instant::now();
        while o
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            o.window.pop_front();
        }
        if o.window.len() >= limit {
            let oldest = *o.window.front().unwrap();
            let wait = Duration::from_secs(60).saturating_sub(now.duration_since(oldest));
            return Err(wait.as_secs_f64().ceil().max(1.0) as u64);
        }
        o.window.push_back(now);
        Ok(())
    }

    pub fn customer_by_external(&self, org: uuid::Uuid, ext: &str) -> Option<&Customer> {
        self.orgs
            .get(&org)?
            .customers
            .iter()
            .find(|c| c.external_id.as_deref() == Some(ext))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_their_scopes() {
        let t = parse_tokens("polar_oat_a, polar_oat_b=events:read+customers:read,,");
        assert_eq!(t.len(), 2);
        assert_ne!(t["polar_oat_a"].org, t["polar_oat_b"].org);
        assert!(t["polar_oat_a"].allows(&["events:write"]));
        let b = &t["polar_oat_b"];
        assert!(b.allows(&["events:read", "events:write"]));
        assert!(!b.allows(&["events:write"]));
        assert!(!b.allows(&["customers:write"]));
    }
}
