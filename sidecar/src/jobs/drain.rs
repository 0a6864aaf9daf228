//! Delivery: claim due events one organization at a time (one batch each,
//! in turn, so one organization's backlog never holds back another's fresh
//! events by more than a round), send them to Polar, report each outcome.
//! Claim (commit), call, report (commit): no transaction spans a Polar call.
//! What each answer calls for is decided in outcome.rs; this file only
//! performs it.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

use super::outcome::{decide, Polar, Report};
use super::{JobError, Jobs};
use crate::polar::events;
use crate::store::outbox::{self, Claimed, Held};
use crate::store::until_taken;

/// Polar caps a body at 10 MiB; stay well under it.
const MAX_BODY_BYTES: usize = 9 * 1024 * 1024;
/// Organizations taken per round.
const ORGS_PER_ROUND: i32 = 100;
/// Handed back while Polar is unavailable: due again this soon (the probe
/// decides when delivery resumes).
const PAUSED_RETRY: Duration = Duration::from_secs(5);

/// An event ready to send: its id, and its JSON as Polar receives it.
struct Outgoing {
    id: Uuid,
    json: Vec<u8>,
}

pub async fn run(jobs: Arc<Jobs>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        if let Err(e) = drain(&jobs, &stop).await {
            tracing::warn!(error = %e, "draining the outbox failed");
        }
        if !jobs.wait(&jobs.wake.drain, jobs.s.poll, &mut stop).await {
            return;
        }
    }
}

enum Flow {
    Continue,
    Paused,
}

/// Rounds until nothing is due (a cron tick is a floor, not a ceiling): each
/// round gives every due organization one batch; the shared budget paces calls.
pub async fn drain(jobs: &Jobs, stop: &watch::Receiver<bool>) -> Result<(), JobError> {
    loop {
        if *stop.borrow() || jobs.health.is_paused() {
            return Ok(());
        }
        let orgs = outbox::due_organizations(&jobs.pool, ORGS_PER_ROUND).await?;
        if orgs.is_empty() {
            return Ok(());
        }
        for org in orgs {
            if *stop.borrow() || jobs.health.is_paused() {
                return Ok(());
            }
            let claim =
                outbox::claim_delivery(&jobs.pool, &org, jobs.s.batch_size, jobs.s.lease).await?;
            let Some(claim) = claim else { continue };
            let events: Vec<Outgoing> = claim.events.iter().map(|e| outgoing(&org, e)).collect();
            let chunks = chunks_under(&events, MAX_BODY_BYTES);
            for (i, chunk) in chunks.iter().enumerate() {
                if let Flow::Paused = send(jobs, &org, claim.batch_id, chunk).await? {
                    // Hand the rest back untouched; the probe resumes delivery.
                    let rest: Vec<Uuid> = chunks[i + 1..]
                        .iter()
                        .flat_map(|c| c.iter().map(|e| e.id))
                        .collect();
                    defer(
                        jobs,
                        Held {
                            org: &org,
                            batch: claim.batch_id,
                            ids: &rest,
                        },
                        PAUSED_RETRY,
                    )
                    .await?;
                    return Ok(());
                }
            }
        }
    }
}

fn outgoing(org: &str, e: &Claimed) -> Outgoing {
    Outgoing {
        id: e.event_id,
        json: events::encode(org, e),
    }
}

/// Sends one chunk and performs what its answers call for, isolating
/// refused events.
async fn send(jobs: &Jobs, org: &str, batch: Uuid, events: &[Outgoing]) -> Result<Flow, JobError> {
    let polar = jobs.polar.as_ref().expect("drain runs with a Polar client");
    let mut pending: Vec<Vec<&Outgoing>> = vec![events.iter().collect()];
    while let Some(chunk) = pending.pop() {
        if chunk.is_empty() {
            continue;
        }
        let ids: Vec<Uuid> = chunk.iter().map(|e| e.id).collect();
        if jobs.health.is_paused() {
            return pause(jobs, org, batch, &ids, &pending).await;
        }
        jobs.budget.acquire().await?;
        let bodies: Vec<&[u8]> = chunk.iter().map(|e| e.json.as_slice()).collect();
        let answer = polar.ingest(&bodies).await;
        let steps = decide(&answer, chunk.len());
        match &steps.polar {
            Polar::Healthy => {
                jobs.health.success();
            }
            Polar::Systemic(cause) => {
                if jobs.health.systemic(cause) {
                    tracing::error!(cause = %cause, "Polar is unavailable: delivery paused");
                    jobs.wake.probe.notify_one();
                }
                return pause(jobs, org, batch, &ids, &pending).await;
            }
            Polar::Transient(cause) => {
                if jobs.polar_wide(cause).await {
                    return pause(jobs, org, batch, &ids, &pending).await;
                }
            }
        }
        if let Some(wait) = steps.hold {
            jobs.budget.pause(wait).await?;
        }
        for report in &steps.reports {
            perform(jobs, org, batch, report, &ids).await?;
        }
        // Resent in the order given: pushed last first.
        for part in steps.resend.iter().rev() {
            pending.push(part.iter().map(|i| chunk[*i]).collect());
        }
    }
    Ok(Flow::Continue)
}

/// One report to the database, with its metric and log line.
async fn perform(
    jobs: &Jobs,
    org: &str,
    batch: Uuid,
    report: &Report,
    chunk: &[Uuid],
) -> Result<(), JobError> {
    let ids: Vec<Uuid> = report.positions().iter().map(|i| chunk[*i]).collect();
    let h = Held {
        org,
        batch,
        ids: &ids,
    };
    let (m, pool, n) = (&jobs.metrics, &jobs.pool, ids.len());
    match report {
        Report::Sent(_) => {
            let sent = until_taken("delivery_sent", || outbox::delivery_sent(pool, h)).await?;
            m.events_delivered.fetch_add(sent as u64, Ordering::Relaxed);
            tracing::info!(
                organization_id = org,
                events = n,
                marked_sent = sent,
                "delivered to Polar"
            );
        }
        Report::Unconfirmed(_, detail) => {
            tracing::error!(organization_id = org, events = n, detail = %detail,
                "Polar's answer does not add up; nothing marked sent");
            let f = until_taken("delivery_unconfirmed", || {
                outbox::delivery_unconfirmed(pool, h, detail)
            })
            .await?;
            m.events_dropped
                .fetch_add(f.dropped as u64, Ordering::Relaxed);
        }
        Report::Deferred(_, wait) => {
            defer(jobs, h, *wait).await?;
            tracing::info!(
                events = n,
                retry_after_secs = wait.as_secs(),
                "Polar rate-limited us"
            );
        }
        Report::TooEarly(_, message) => {
            let retried = until_taken("delivery_too_early", || {
                outbox::delivery_too_early(pool, h, message)
            })
            .await?;
            m.events_deferred
                .fetch_add(retried as u64, Ordering::Relaxed);
            tracing::warn!(
                organization_id = org,
                events = n,
                retried,
                "Polar found events in its future (clock skew?)"
            );
        }
        Report::Rejected(_, message) => {
            let rejected = until_taken("delivery_rejected", || {
                outbox::delivery_rejected(pool, h, message)
            })
            .await?;
            m.events_rejected
                .fetch_add(rejected as u64, Ordering::Relaxed);
            tracing::warn!(organization_id = org, rejected, error = %message, "Polar rejected events; resending the rest");
        }
        Report::Failed(_, cause) => {
            let f = until_taken("delivery_failed", || {
                outbox::delivery_failed(pool, h, cause)
            })
            .await?;
            m.events_dropped
                .fetch_add(f.dropped as u64, Ordering::Relaxed);
            tracing::warn!(organization_id = org, events = n, error = %cause, "delivery to Polar failed; backing off");
        }
    }
    Ok(())
}

/// Delivery paused: the chunk in hand and every chunk still pending go back
/// untouched (the probe decides when delivery resumes).
async fn pause(
    jobs: &Jobs,
    org: &str,
    batch: Uuid,
    ids: &[Uuid],
    pending: &[Vec<&Outgoing>],
) -> Result<Flow, JobError> {
    let all: Vec<Uuid> = ids
        .iter()
        .copied()
        .chain(pending.iter().flatten().map(|e| e.id))
        .collect();
    defer(
        jobs,
        Held {
            org,
            batch,
            ids: &all,
        },
        PAUSED_RETRY,
    )
    .await?;
    Ok(Flow::Paused)
}

/// Back to pending after `wait`, attempts untouched.
async fn defer(jobs: &Jobs, h: Held<'_>, wait: Duration) -> Result<(), JobError> {
    if h.ids.is_empty() {
        return Ok(());
    }
    let n = until_taken("delivery_deferred", || {
        outbox::delivery_deferred(&jobs.pool, h, wait)
    })
    .await?;
    jobs.metrics
        .events_deferred
        .fetch_add(n as u64, Ordering::Relaxed);
    Ok(())
}

/// Splits events into runs whose JSON body stays under `limit` bytes.
fn chunks_under(events: &[Outgoing], limit: usize) -> Vec<&[Outgoing]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 16);
    for (i, e) in events.iter().enumerate() {
        let n = e.json.len() + 1;
        if i > start && size + n > limit {
            out.push(&events[start..i]);
            start = i;
            size = 16;
        }
        size += n;
    }
    if start < events.len() {
        out.push(&events[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chunks_respect_the_byte_limit_and_keep_every_event() {
        let events: Vec<Outgoing> = (0..100)
            .map(|i| Outgoing {
                id: Uuid::new_v4(),
                json: serde_json::to_vec(&json!({"n": "x".repeat(90), "i": i})).unwrap(),
            })
            .collect();
        let chunks = chunks_under(&events, 1000);
        assert!(chunks.len() > 10);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 100);
        for c in &chunks {
            let parts: Vec<&[u8]> = c.iter().map(|e| e.json.as_slice()).collect();
            let body = events::ingest_body(&parts);
            assert!(body.len() <= 1000, "{}", body.len());
        }
        assert_eq!(chunks_under(&events, usize::MAX).len(), 1);
        assert!(chunks_under(&[], 10).is_empty());
    }
}
