//! Polar's ingest validation (docs/polar.md §1), reproduced from its pydantic
//! schemas: per-event errors carry `loc = ["body","events",i,<union member>,field]`,
//! and any error rejects the whole batch.
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

#[derive(Debug)]
pub struct Parsed {
    pub name: String,
    pub timestamp: DateTime<Utc>,
    pub external_customer_id: Option<String>,
    pub customer_id: Option<String>,
    pub organization_id_set: bool,
    pub external_id: Option<String>,
    pub metadata: Map<String, Value>,
}

fn err(kind: &str, loc: Vec<Value>, msg: &str, input: &Value) -> Value {
    json!({"type": kind, "loc": loc, "msg": msg, "input": input})
}

/// Schema-level validation of a whole `EventsIngest` body. Ok: the parsed
/// events; Err: the `detail` list of a `RequestValidationError` 422.
pub fn ingest(body: &Value, now: DateTime<Utc>) -> Result<Vec<Parsed>, Vec<Value>> {
    let Some(events) = body.get("events") else {
        return Err(vec![err(
            "missing",
            vec![json!("body"), json!("events")],
            "Field required",
            body,
        )]);
    };
    let Some(events) = events.as_array() else {
        return Err(vec![err(
            "list_type",
            vec![json!("body"), json!("events")],
            "Input should be a valid list",
            events,
        )]);
    };
    let mut out = Vec::with_capacity(events.len());
    let mut errors = Vec::new();
    for (i, ev) in events.iter().enumerate() {
        match event(i, ev, now) {
            Ok(p) => out.push(p),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn event(i: usize, ev: &Value, now: DateTime<Utc>) -> Result<Parsed, Vec<Value>> {
    let base = || vec![json!("body"), json!("events"), json!(i)];
    let Some(obj) = ev.as_object() else {
        return Err(vec![err(
            "model_attributes_type",
            base(),
            "Input should be a valid dictionary or object",
            ev,
        )]);
    };
    // Untagged union: with external_customer_id it is the external variant
    // (customer_id is then dropped); otherwise the customer variant.
    let variant = if obj.contains_key("external_customer_id") {
        "EventCreateExternalCustomer"
    } else {
        "EventCreateCustomer"
    };
    let loc = |field: &str| {
        let mut l = base();
        l.push(json!(variant));
        l.push(json!(field));
        l
    };
    let mut errors = Vec::new();

    let name = match obj.get("name") {
        None => {
            errors.push(err("missing", loc("name"), "Field required", ev));
            String::new()
        }
        Some(Value::String(s)) if s.chars().count() > 128 => {
            errors.push(err(
                "string_too_long",
                loc("name"),
                "String should have at most 128 characters",
                &json!(s),
            ));
            String::new()
        }
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            errors.push(err(
                "string_type",
                loc("name"),
                "Input should be a valid string",
                v,
            ));
            String::new()
        }
    };

    let timestamp = match obj.get("timestamp") {
        None | Some(Value::Null) => now,
        Some(Value::String(s)) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) if t.to_utc() > now => {
                errors.push(err(
                    "value_error",
                    loc("timestamp"),
                    "Value error, Timestamp must be in the past.",
                    &json!(s),
                ));
                now
            }
            Ok(t) => t.to_utc(),
            Err(_) if chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").is_ok() => {
                errors.push(err(
                    "timezone_aware",
                    loc("timestamp"),
                    "Input should have timezone info",
                    &json!(s),
                ));
                now
            }
            Err(_) => {
                errors.push(err(
                    "datetime_from_date_parsing",
                    loc("timestamp"),
                    "Input should be a valid datetime",
                    &json!(s),
                ));
                now
            }
        },
        Some(v) => {
            errors.push(err(
                "datetime_type",
                loc("timestamp"),
                "Input should be a valid datetime",
                v,
            ));
            now
        }
    };

    let (external_customer_id, customer_id) = if variant == "EventCreateExternalCustomer" {
        match obj.get("external_customer_id") {
            Some(Value::String(s)) => (Some(s.clone()), None),
            Some(v) => {
                errors.push(err(
                    "string_type",
                    loc("external_customer_id"),
                    "Input should be a valid string",
                    v,
                ));
                (None, None)
            }
            None => unreachable!(),
        }
    } else {
        match obj.get("customer_id") {
            Some(Value::String(s)) if uuid::Uuid::parse_str(s).is_ok() => (None, Some(s.clone())),
            Some(v) => {
                errors.push(err(
                    "uuid_parsing",
                    loc("customer_id"),
                    "Input should be a valid UUID",
                    v,
                ));
                (None, None)
            }
            None => {
                // Neither id: pydantic reports both union members.
                errors.push(err("missing", loc("customer_id"), "Field required", ev));
                let mut l = base();
                l.push(json!("EventCreateExternalCustomer"));
                l.push(json!("external_customer_id"));
                errors.push(err("missing", l, "Field required", ev));
                (None, None)
            }
        }
    };

    let external_id = match obj.get("external_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            errors.push(err(
                "string_type",
                loc("external_id"),
                "Input should be a valid string",
                v,
            ));
            None
        }
    };
    let organization_id_set = !matches!(obj.get("organization_id"), None | Some(Value::Null));

    let metadata = match obj.get("metadata") {
        None => Map::new(),
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let mut l = loc("metadata");
                l.push(json!(k));
                if let Some(e) = metadata_value(k, v, l) {
                    errors.push(e);
                }
            }
            m.clone()
        }
        Some(v) => {
            errors.push(err(
                "dict_type",
                loc("metadata"),
                "Input should be a valid dictionary",
                v,
            ));
            Map::new()
        }
    };

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Parsed {
        name,
        timestamp,
        external_customer_id,
        customer_id,
        organization_id_set,
        external_id,
        metadata,
    })
}

fn metadata_value(key: &str, v: &Value, loc: Vec<Value>) -> Option<Value> {
    match v {
        Value::String(s) if s.is_empty() => Some(err(
            "string_too_short",
            loc,
            "String should have at least 1 character",
            v,
        )),
        Value::String(s) if s.chars().count() > 500 => Some(err(
            "string_too_long",
            loc,
            "String should have at most 500 characters",
            v,
        )),
        Value::String(s) if s.contains('\0') => Some(err(
            "value_error",
            loc,
            "Value error, This value contains invalid characters",
            v,
        )),
        Value::String(_) | Value::Bool(_) => None,
        Value::Number(n) if n.as_f64().is_some_and(f64::is_finite) => None,
        Value::Number(_) => Some(err(
            "finite_number",
            loc,
            "Input should be a finite number",
            v,
        )),
        Value::Object(o)
            if key == "_cost"
                && o.contains_key("amount")
                && o.get("currency") == Some(&json!("usd")) =>
        {
            None
        }
        Value::Object(o)
            if key == "_llm"
                && [
                    "vendor",
                    "model",
                    "input_tokens",
                    "output_tokens",
                    "total_tokens",
                ]
                .iter()
                .all(|f| o.contains_key(*f)) =>
        {
            None
        }
        _ => Some(err(
            "union_tag_invalid",
            loc,
            "Input should be a valid string, integer, number or boolean",
            v,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-06-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_good_batch_parses() {
        let b = json!({"events": [
            {"name": "a", "external_customer_id": "acme", "external_id": "x", "timestamp": "2026-05-01T00:00:00Z",
             "metadata": {"s": "v", "n": 1, "f": 1.5, "b": true, "_cost": {"amount": 1, "currency": "usd"}}, "unknown": 1},
        ]});
        let p = ingest(&b, now()).unwrap();
        assert_eq!(p[0].external_customer_id.as_deref(), Some("acme"));
        assert_eq!(p[0].metadata.len(), 5);
    }

    #[test]
    fn errors_carry_the_event_index_and_union_member() {
        let b = json!({"events": [
            {"name": "ok", "external_customer_id": "a"},
            {"name": "n".repeat(129), "external_customer_id": "a"},
            {"name": "a", "external_customer_id": "a", "timestamp": "2026-07-01T00:00:00Z"},
            {"name": "a", "external_customer_id": "a", "timestamp": "2026-05-01T00:00:00"},
            {"name": "a", "external_customer_id": "a", "metadata": {"x": null, "y": "", "z": [1], "w": {"a": 1}}},
            {"name": "a"},
        ]});
        let e = ingest(&b, now()).unwrap_err();
        let idx: Vec<u64> = e.iter().map(|d| d["loc"][2].as_u64().unwrap()).collect();
        assert!(!idx.contains(&0));
        for i in 1..=5 {
            assert!(idx.contains(&i), "event {i} reported: {e:?}");
        }
        assert_eq!(
            e[0]["loc"],
            json!(["body", "events", 1, "EventCreateExternalCustomer", "name"])
        );
        assert!(e
            .iter()
            .any(|d| d["msg"] == "Value error, Timestamp must be in the past."));
        assert!(e.iter().any(|d| d["type"] == "timezone_aware"));
        assert_eq!(e.iter().filter(|d| d["loc"][2] == 4).count(), 4);
    }
}
