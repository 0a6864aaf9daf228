//! Drift between what we recorded and what Polar holds.
//!
//! Input on each side is a JSON object keyed by customer (the org id sent as
//! `external_customer_id`). A value is either a count, or an object of
//! event name -> count. Per customer, `delta = remote - local`;
//! `drift = Σ |delta|` and `drift_ratio = drift / local_total`. With no
//! local events the ratio is 0 when Polar holds nothing either, else 1
//! (everything at Polar is unexplained), so it is always a finite number.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

use crate::sqlstate::{self, Violation};

type Counts = BTreeMap<String, BTreeMap<String, i64>>;
const ALL: &str = "*";

fn counts(side: &str, v: &Value) -> Result<Counts, Violation> {
    let err = |m: String| {
        Err(Violation::new(
            sqlstate::DRIFT_INPUT,
            format!("compute_drift: {side}: {m}"),
        ))
    };
    let Some(obj) = v.as_object() else {
        return err("must be an object of customer -> count".into());
    };
    let mut out = Counts::new();
    for (customer, val) in obj {
        let by_name = out.entry(customer.clone()).or_default();
        match val {
            Value::Object(names) => {
                for (name, n) in names {
                    let Some(n) = n.as_i64().filter(|n| *n >= 0) else {
                        return err(format!("{customer}.{name} must be a non-negative integer"));
                    };
                    *by_name.entry(name.clone()).or_default() += n;
                }
            }
            other => {
                let Some(n) = other.as_i64().filter(|n| *n >= 0) else {
                    return err(format!(
                        "{customer} must be a non-negative integer or an object"
                    ));
                };
                *by_name.entry(ALL.into()).or_default() += n;
            }
        }
    }
    Ok(out)
}

fn total(c: &BTreeMap<String, i64>) -> i64 {
    c.values().sum()
}

/// Totals, per-customer deltas (only where they differ; with per-name detail
/// when both sides gave names), `drift` and `drift_ratio`.
pub fn compute(local: &Value, remote: &Value) -> Result<Value, Violation> {
    let local = counts("local", local)?;
    let remote = counts("remote", remote)?;
    let empty = BTreeMap::new();
    let customers: std::collections::BTreeSet<&String> =
        local.keys().chain(remote.keys()).collect();
    let (mut local_total, mut remote_total, mut drift) = (0i64, 0i64, 0i64);
    let mut rows = Vec::new();
    for c in customers {
        let l = local.get(c).unwrap_or(&empty);
        let r = remote.get(c).unwrap_or(&empty);
        let (lt, rt) = (total(l), total(r));
        local_total += lt;
        remote_total += rt;
        // Per-name deltas count toward drift when names are known on both
        // sides, so 3 missing "a" plus 3 extra "b" is drift 6, not 0.
        let named = !l.contains_key(ALL) && !r.contains_key(ALL);
        let mut names = Map::new();
        let customer_drift = if named {
            let mut sum = 0;
            let all: std::collections::BTreeSet<&String> = l.keys().chain(r.keys()).collect();
            for n in all {
                let (a, b) = (*l.get(n).unwrap_or(&0), *r.get(n).unwrap_or(&0));
                if a != b {
                    names.insert(n.clone(), json!({"local": a, "remote": b, "delta": b - a}));
                    sum += (b - a).abs();
                }
            }
            sum
        } else {
            (rt - lt).abs()
        };
        if customer_drift != 0 {
            drift += customer_drift;
            let mut row = json!({"customer": c, "local": lt, "remote": rt, "delta": rt - lt, "drift": customer_drift});
            if !names.is_empty() {
                row["event_names"] = Value::Object(names);
            }
            rows.push(row);
        }
    }
    let ratio = if local_total > 0 {
        drift as f64 / local_total as f64
    } else if drift == 0 {
        0.0
    } else {
        1.0
    };
    Ok(json!({
        "local_total": local_total,
        "remote_total": remote_total,
        "drift": drift,
        "drift_ratio": ratio,
        "customers": rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_sides_have_no_drift() {
        let v = compute(&json!({"a": 5, "b": 3}), &json!({"b": 3, "a": 5})).unwrap();
        assert_eq!(v["drift"], 0);
        assert_eq!(v["drift_ratio"], 0.0);
        assert_eq!(v["local_total"], 8);
        assert_eq!(v["customers"], json!([]));
    }

    #[test]
    fn empty_sides() {
        let v = compute(&json!({}), &json!({})).unwrap();
        assert_eq!(
            (v["drift"].as_i64(), v["drift_ratio"].as_f64()),
            (Some(0), Some(0.0))
        );
        let v = compute(&json!({}), &json!({"x": 4})).unwrap();
        assert_eq!(v["drift"], 4);
        assert_eq!(
            v["drift_ratio"], 1.0,
            "zero local events with remote events is 100% drift"
        );
        let v = compute(&json!({"x": 4}), &json!({})).unwrap();
        assert_eq!(v["drift_ratio"], 1.0);
        assert_eq!(
            v["customers"][0],
            json!({"customer":"x","local":4,"remote":0,"delta":-4,"drift":4})
        );
    }

    #[test]
    fn customers_on_one_side_only() {
        let v = compute(&json!({"a": 100, "b": 100}), &json!({"a": 98, "c": 1})).unwrap();
        assert_eq!(v["drift"], 2 + 100 + 1);
        assert_eq!(v["drift_ratio"], 103.0 / 200.0);
        let c: Vec<&str> = v["customers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["customer"].as_str().unwrap())
            .collect();
        assert_eq!(c, ["a", "b", "c"]);
    }

    #[test]
    fn per_name_detail_catches_offsetting_errors() {
        let v = compute(&json!({"a": {"x": 3, "y": 0}}), &json!({"a": {"y": 3}})).unwrap();
        assert_eq!(v["drift"], 6);
        assert_eq!(v["customers"][0]["delta"], 0);
        assert_eq!(v["customers"][0]["event_names"]["x"]["delta"], -3);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(compute(&json!([]), &json!({})).is_err());
        assert!(compute(&json!({"a": -1}), &json!({})).is_err());
        assert!(compute(&json!({}), &json!({"a": "3"})).is_err());
        assert!(compute(&json!({}), &json!({"a": {"n": 1.5}})).is_err());
    }
}
