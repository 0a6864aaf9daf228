//! Recording: POST /api/v1/meter (one event, its idempotency key in a
//! header) and POST /api/v1/meter/batch (up to 1,000, each answered alone).
use hyper::body::Incoming;
use hyper::header::HeaderName;
use hyper::{Request, StatusCode};
use polar_meter_rules::sqlstate;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::extract::{bearer, discard_rest, event, json_response, parse_json, read_body};
use super::{App, Handled};
use crate::problem::Problem;
use crate::recorder::Outcome;

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// POST /api/v1/meter: one event, judged exactly as one item of a batch is
/// (the same rules, the same problem types, naming the field), its
/// idempotency key taken from the Idempotency-Key header.
pub(super) async fn meter(app: &App, req: Request<Incoming>) -> Handled {
    let key = bearer(req.headers())?;
    if let Err(p) = app.admission.admit(&key).await {
        discard_rest(req.into_body()).await;
        return Err(p);
    }
    let idem = match req.headers().get(&IDEMPOTENCY_KEY) {
        None => {
            return Err(Problem::bad_idempotency_key(
                "the Idempotency-Key header is required",
            ))
        }
        Some(v) => v
            .to_str()
            .map_err(|_| Problem::bad_idempotency_key("Idempotency-Key must be printable ASCII"))?
            .to_string(),
    };
    let body = read_body(app, req, app.limits.max_body_bytes).await?;
    let raw: &RawValue = serde_json::from_slice(&body.bytes)
        .map_err(|e| Problem::malformed_body(format!("body is not valid JSON: {e}")))?;
    let mut event = event(raw.get()).map_err(|v| Problem::from_sql(v.sqlstate, &v.message))?;
    drop(body);
    // Not an object: the extension refuses it as it refuses such a batch item.
    if let Value::Object(fields) = &mut event {
        if fields.contains_key("idempotency_key") {
            return Err(Problem::from_sql(
                sqlstate::EVENT_SHAPE,
                "idempotency_key is sent in the Idempotency-Key header, not in the body",
            ));
        }
        fields.insert("idempotency_key".into(), Value::String(idem));
    }
    let r = app.recorder.record_one(key, event).await?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({"status": r.status, "event_id": r.event_id}),
    ))
}

/// The batch's envelope; its events are parsed one by one (event), so that
/// one item's mistake is that item's answer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    #[serde(default)]
    events: Option<Box<RawValue>>,
}

/// POST /api/v1/meter/batch: up to 1,000 events, each answered alone.
pub(super) async fn meter_batch(app: &App, req: Request<Incoming>) -> Handled {
    let key = bearer(req.headers())?;
    // The key first: without a valid one, nothing scarce is taken.
    if let Err(p) = app.admission.admit(&key).await {
        discard_rest(req.into_body()).await;
        return Err(p);
    }
    // Taken before the body is read: a waiting batch holds only its socket.
    let Ok(Ok(_slot)) =
        tokio::time::timeout(app.limits.batch_wait, app.batch_slots.acquire()).await
    else {
        discard_rest(req.into_body()).await;
        let mut p = Problem::overloaded();
        p.detail = "no event of the batch was recorded; send it again as it is".into();
        return Err(p);
    };
    let body = read_body(app, req, app.limits.batch_max_body_bytes).await?;
    // serde would read a JSON array as the envelope's fields in order.
    if body.bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Problem::malformed_body(
            "the body must be a JSON object {\"events\": [...]}",
        ));
    }
    let envelope: Envelope = parse_json(&body.bytes)?;
    let items: Option<Vec<&RawValue>> = envelope
        .events
        .as_deref()
        .and_then(|e| serde_json::from_str(e.get()).ok());
    // The envelope's rule is the extension's (polar_meter_rules::batch), checked
    // here too so that a bad envelope costs no database call.
    polar_meter_rules::batch::envelope_len(items.as_ref().map(Vec::len))
        .map_err(|v| Problem::from_sql(v.sqlstate, &v.message))?;
    let events = items
        .unwrap_or_default()
        .into_iter()
        .map(|raw| event(raw.get()))
        .collect();
    // The parsed events are what lives on; the bytes give back their budget.
    drop(envelope);
    drop(body);
    let outcomes = app.recorder.record(&key, events).await;
    // A key error or an outage is the same for every item: answer it whole.
    if let Some(Err(p)) = outcomes.first() {
        if outcomes
            .iter()
            .all(|o| matches!(o, Err(q) if q.slug == p.slug))
            && (p.status == StatusCode::UNAUTHORIZED
                || p.status == StatusCode::FORBIDDEN
                || p.status.is_server_error())
        {
            return Err(p.clone());
        }
    }
    let results: Vec<Value> = outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| item_json(i, o))
        .collect();
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "results": results }),
    ))
}

fn item_json(index: usize, o: Outcome) -> Value {
    match o {
        Ok(r) => json!({"status": r.status, "event_id": r.event_id}),
        Err(p) => {
            let mut problem = p.body();
            problem["index"] = json!(index);
            json!({"status": "error", "problem": problem})
        }
    }
}
