//! Forwarding alerts: claim alert rows (each goes to one sidecar), log each as
//! a structured warning, POST it to ALERT_WEBHOOK_URL, and report the result.
//! Delivery to the webhook is at least once: a sidecar that dies between the
//! POST and the report leaves the alert to be claimed again when its lease
//! ends, with the same dedup_key. Without a webhook the log is the delivery.

use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use super::{JobError, Jobs};
use crate::store::alerts::{self, Alert};

/// Characters of an alert's detail written to the log (the webhook gets all of it).
const LOGGED_DETAIL_CHARS: usize = 1000;

pub async fn run(jobs: Arc<Jobs>, mut stop: watch::Receiver<bool>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("polar-meterd/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("http client");
    loop {
        if *stop.borrow() {
            return;
        }
        if let Err(e) = forward_due(&jobs, &http).await {
            tracing::warn!(error = %e, "forwarding alerts failed");
        }
        if !jobs.wait(&jobs.wake.alerts, jobs.s.poll, &mut stop).await {
            return;
        }
    }
}

/// The JSON body the webhook receives (README, "Alerts").
pub fn webhook_body(a: &Alert) -> Value {
    json!({
        "source": "polar-meter",
        "alert_id": format!("{}/{}", a.organization_id, a.alert_id),
        "dedup_key": a.dedup_key,
        "kind": a.kind,
        "organization_id": a.organization_id,
        "raised_at": a.raised_at,
        "attempt": a.attempts,
        "detail": a.detail,
    })
}

async fn forward_due(jobs: &Jobs, http: &reqwest::Client) -> Result<(), JobError> {
    loop {
        let rows = alerts::claim_alerts(&jobs.pool).await?;
        if rows.is_empty() {
            return Ok(());
        }
        let url = jobs.webhook.read().unwrap().clone();
        for row in rows {
            let body = webhook_body(&row);
            let org = &row.organization_id;
            // Plain values, and the detail cut short: the log is not the place
            // for a payload of any size.
            let detail = body["detail"].to_string();
            let detail = match detail.char_indices().nth(LOGGED_DETAIL_CHARS) {
                Some((cut, _)) => format!("{}…", &detail[..cut]),
                None => detail,
            };
            tracing::warn!(kind = body["kind"].as_str().unwrap_or_default(), organization_id = %org,
                alert_id = body["alert_id"].as_str().unwrap_or_default(),
                dedup_key = body["dedup_key"].as_str().unwrap_or_default(), detail, "alert");
            let result = match &url {
                None => Ok(()),
                Some(url) => match http.post(url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(format!("webhook answered HTTP {}", r.status().as_u16())),
                    Err(e) => Err(format!("webhook unreachable: {}", e.without_url())),
                },
            };
            match result {
                Ok(()) => {
                    alerts::alert_forwarded(&jobs.pool, &row).await?;
                    jobs.metrics
                        .alerts_forwarded
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let status = alerts::alert_forward_failed(&jobs.pool, &row, &e).await?;
                    jobs.metrics
                        .alert_forward_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(alert_id = %body["alert_id"], error = %e, status = status.as_deref().unwrap_or("?"),
                        "alert not forwarded; it is retried");
                }
            }
        }
    }
}
