//! Polar's event formats, and their translation to and from ours: what we
//! send (EventCreateExternalCustomer, inside EventsIngest) and what Polar's
//! event list returns (ListResource[Event]). The extension knows neither: it
//! hands over events as stored (store::outbox::Claimed) and takes listed
//! events back as typed rows (store::reconcile::Listed).
use chrono::{DateTime, SecondsFormat, Utc};
use polar_meter_rules::validate::RESERVED_METADATA_KEY;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::store::outbox::Claimed;
use crate::store::reconcile::Listed;

/// EventCreateExternalCustomer: our organization is Polar's customer by
/// external id, and the event's external_id makes a resend a duplicate.
#[derive(Serialize)]
struct EventCreateExternalCustomer<'a> {
    name: &'a str,
    external_customer_id: &'a str,
    external_id: &'a str,
    timestamp: String,
    metadata: WithEventId<'a>,
}

/// The event's metadata plus our event id under the reserved key: Polar's
/// event list does not return external_id, so reconciliation matches on it.
struct WithEventId<'a> {
    metadata: &'a Value,
    event_id: Uuid,
}

impl Serialize for WithEventId<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = self.metadata.as_object();
        let mut m = s.serialize_map(Some(fields.map_or(0, Map::len) + 1))?;
        for (k, v) in fields.into_iter().flatten() {
            // The extension refuses the reserved key at recording; never twice.
            if k != RESERVED_METADATA_KEY {
                m.serialize_entry(k, v)?;
            }
        }
        m.serialize_entry(RESERVED_METADATA_KEY, &self.event_id)?;
        m.end()
    }
}

/// A UTC timestamp as Polar is sent it: RFC 3339, microseconds, Z.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// One event of an ingest body, serialised (the drain sizes chunks by it).
pub fn encode(org: &str, e: &Claimed) -> Vec<u8> {
    serde_json::to_vec(&EventCreateExternalCustomer {
        name: &e.event_name,
        external_customer_id: org,
        external_id: &e.external_id,
        timestamp: timestamp(e.event_timestamp),
        metadata: WithEventId {
            metadata: &e.metadata,
            event_id: e.event_id,
        },
    })
    .expect("JSON values serialise")
}

/// EventsIngest around events serialised by `encode`.
pub fn ingest_body(events: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + 16);
    body.extend_from_slice(b"{\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e);
    }
    body.extend_from_slice(b"]}");
    body
}

/// What we read of a listed event (UserEvent; a SystemEvent is never asked
/// for: the list is filtered on source=user).
#[derive(Deserialize)]
struct ListedEvent {
    id: String,
    name: String,
    timestamp: DateTime<Utc>,
    #[serde(default)]
    external_customer_id: Option<String>,
    #[serde(default)]
    customer: Option<CustomerRef>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
struct CustomerRef {
    #[serde(default)]
    external_id: Option<String>,
}

/// One listed event in our terms; an item that is not an event of Polar's
/// (no id, name or timestamp) is an error naming what is missing.
pub fn listed(item: &Value) -> Result<Listed, String> {
    let e = ListedEvent::deserialize(item).map_err(|e| format!("an event Polar listed: {e}"))?;
    let customer = e
        .external_customer_id
        .or_else(|| e.customer.and_then(|c| c.external_id))
        .unwrap_or_default();
    let event_id = e
        .metadata
        .as_ref()
        .and_then(|m| m.get(RESERVED_METADATA_KEY))
        .and_then(Value::as_str)
        .filter(|s| s.len() == 36)
        .and_then(|s| Uuid::parse_str(s).ok());
    Ok(Listed {
        polar_id: e.id,
        customer,
        event_id,
        name: e.name,
        timestamp: e.timestamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claimed() -> Claimed {
        Claimed {
            event_id: Uuid::parse_str("0b7e1a8e-6c1f-4c0b-9d1e-2f3a4b5c6d7e").unwrap(),
            event_name: "api.call".into(),
            event_timestamp: "2026-12-01T10:00:00.123456Z".parse().unwrap(),
            external_id: "pm_abc".into(),
            metadata: json!({"tokens": 12, "model": "x"}),
        }
    }

    #[test]
    fn the_ingest_body_is_polars_event_create_external_customer() {
        let e = claimed();
        let body: Value = serde_json::from_slice(&ingest_body(&[&encode("acme", &e)])).unwrap();
        assert_eq!(
            body,
            json!({"events": [{
                "name": "api.call",
                "external_customer_id": "acme",
                "external_id": "pm_abc",
                "timestamp": "2026-12-01T10:00:00.123456Z",
                "metadata": {"tokens": 12, "model": "x", "meter_event_id": "0b7e1a8e-6c1f-4c0b-9d1e-2f3a4b5c6d7e"},
            }]})
        );
        assert_eq!(ingest_body(&[]), b"{\"events\":[]}");
    }

    #[test]
    fn a_listed_event_reads_its_customer_and_our_event_id() {
        let item = json!({"id": "p1", "name": "api.call", "timestamp": "2026-12-01T10:00:00.5Z",
            "customer": {"external_id": "acme"}, "external_customer_id": null, "source": "user",
            "metadata": {"meter_event_id": "0b7e1a8e-6c1f-4c0b-9d1e-2f3a4b5c6d7e", "n": 1}});
        let l = listed(&item).unwrap();
        assert_eq!(l.customer, "acme");
        assert_eq!(l.event_id, Some(claimed().event_id));
        assert_eq!(
            l.timestamp,
            "2026-12-01T10:00:00.5Z".parse::<DateTime<Utc>>().unwrap()
        );
        let other = json!({"id": "p2", "name": "n", "timestamp": "2026-12-01T10:00:00Z",
            "external_customer_id": "beta", "metadata": {"meter_event_id": "not-a-uuid"}});
        let l = listed(&other).unwrap();
        assert_eq!((l.customer.as_str(), l.event_id), ("beta", None));
        let e = listed(&json!({"name": "n", "timestamp": "2026-12-01T10:00:00Z"})).unwrap_err();
        assert!(e.contains("id"), "{e}");
    }
}
