//! Delivery: claim due events one organization at a time (one batch each,
//! in turn, so one organization's backlog never holds back another's fresh
//! events by more than a round), send them to Polar, report each outcome.
//! Claim (commit), call, report (commit): no transaction spans a Polar call.
//!
//! Outcomes: accepted -> sent; 429 -> pending again, not an attempt; 422 ->
//! the named events rejected (or retried, when Polar only finds them in its
//! future and they are within max_future_skew of our clock), the rest resent
//! at once, bisecting when Polar names none; a transient failure -> an attempt
//! (backoff, dropped after 7); a systemic failure, or the breaker opening ->
//! everything in hand handed back untouched, and delivery pauses.
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::watch;
use uuid::Uuid;

use super::{JobError, Jobs};
use crate::polar::client::is_future_timestamp;
use crate::polar::{Failure, Ingest};

/// Polar caps a body at 10 MiB; stay well under it.
const MAX_BODY_BYTES: usize = 9 * 1024 * 1024;
/// Organizations taken per round.
const ORGS_PER_ROUND: i32 = 100;

type Event = (Uuid, Value);

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
        let orgs: Vec<String> = {
            let c = jobs.pool.get().await?;
            c.query(
                "SELECT organization_id FROM meter.due_organizations($1)",
                &[&ORGS_PER_ROUND],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
        };
        if orgs.is_empty() {
            return Ok(());
        }
        for org in orgs {
            if *stop.borrow() || jobs.health.is_paused() {
                return Ok(());
            }
            let rows = {
                let c = jobs.pool.get().await?;
                c.query(
                    "SELECT batch_id, event_id, payload FROM meter.claim_events($1, $2, $3::text::interval)",
                    &[&org, &jobs.s.batch_size, &jobs.lease_text()],
                )
                .await?
            };
            let Some(first) = rows.first() else { continue };
            let batch: Uuid = first.get(0);
            let events: Vec<Event> = rows.iter().map(|r| (r.get(1), r.get(2))).collect();
            let chunks = chunks_under(&events, MAX_BODY_BYTES);
            for (i, chunk) in chunks.iter().enumerate() {
                if let Flow::Paused = send(jobs, &org, batch, chunk).await? {
                    // Hand the rest back untouched; the probe resumes delivery.
                    let rest: Vec<Uuid> = chunks[i + 1..]
                        .iter()
                        .flat_map(|c| c.iter().map(|e| e.0))
                        .collect();
                    defer(jobs, &org, batch, &rest, 5).await?;
                    return Ok(());
                }
            }
        }
    }
}

/// Sends one chunk and reports its outcome, isolating refused events.
async fn send(jobs: &Jobs, org: &str, batch: Uuid, events: &[Event]) -> Result<Flow, JobError> {
    let polar = jobs.polar.as_ref().expect("drain runs with a Polar client");
    let mut pending: Vec<Vec<Event>> = vec![events.to_vec()];
    while let Some(chunk) = pending.pop() {
        if chunk.is_empty() {
            continue;
        }
        let ids: Vec<Uuid> = chunk.iter().map(|e| e.0).collect();
        if jobs.health.is_paused() {
            return pause(jobs, org, batch, &ids, &pending).await;
        }
        jobs.budget.acquire().await?;
        let payloads: Vec<&Value> = chunk.iter().map(|e| &e.1).collect();
        match polar.ingest(&payloads).await {
            Ingest::Accepted {
                inserted,
                duplicates,
            } => {
                jobs.health.success();
                // Checked: Polar's figures are untrusted input, and a wrapped
                // sum could equal the batch size.
                if inserted.checked_add(duplicates) != Some(chunk.len() as u64) {
                    let detail = format!(
                        "inserted {inserted} + duplicates {duplicates} for {} events",
                        chunk.len()
                    );
                    tracing::error!(
                        organization_id = org,
                        events = chunk.len(),
                        inserted,
                        duplicates,
                        "Polar's answer does not add up; nothing marked sent"
                    );
                    report_failure(
                        jobs,
                        "SELECT failed, dropped FROM meter.delivery_unconfirmed($1, $2, $3, $4)",
                        org,
                        batch,
                        &ids,
                        &detail,
                    )
                    .await?;
                    continue;
                }
                let n = report_count(
                    jobs,
                    "SELECT meter.delivery_sent($1, $2, $3)",
                    org,
                    batch,
                    &ids,
                    None,
                )
                .await?;
                jobs.metrics
                    .events_delivered
                    .fetch_add(n as u64, Ordering::Relaxed);
                tracing::info!(
                    organization_id = org,
                    events = chunk.len(),
                    inserted,
                    duplicates,
                    marked_sent = n,
                    "delivered to Polar"
                );
            }
            Ingest::RateLimited(wait) => {
                jobs.health.success();
                jobs.budget.pause(wait).await?;
                defer(jobs, org, batch, &ids, wait.as_secs().max(1)).await?;
                tracing::info!(
                    events = chunk.len(),
                    retry_after_secs = wait.as_secs(),
                    "Polar rate-limited us"
                );
            }
            Ingest::Invalid { refused, message } => {
                jobs.health.success();
                let named: Vec<(usize, String)> = refused
                    .into_iter()
                    .filter(|(i, _)| *i < chunk.len())
                    .collect();
                if named.is_empty() && chunk.len() > 1 {
                    // Polar named no event: halve until the bad ones stand alone.
                    let (a, b) = chunk.split_at(chunk.len() / 2);
                    pending.push(b.to_vec());
                    pending.push(a.to_vec());
                    continue;
                }
                let named = if named.is_empty() {
                    vec![(0, message.clone())]
                } else {
                    named
                };
                let (early, bad): (Vec<_>, Vec<_>) =
                    named.iter().partition(|(_, m)| is_future_timestamp(m));
                let pick = |v: &Vec<&(usize, String)>| {
                    v.iter().map(|(i, _)| chunk[*i].0).collect::<Vec<Uuid>>()
                };
                let (early_ids, bad_ids) = (pick(&early), pick(&bad));
                if !early_ids.is_empty() {
                    let n = report_count(
                        jobs,
                        "SELECT meter.delivery_too_early($1, $2, $3, $4)",
                        org,
                        batch,
                        &early_ids,
                        Some(&message),
                    )
                    .await?;
                    jobs.metrics
                        .events_deferred
                        .fetch_add(n as u64, Ordering::Relaxed);
                    tracing::warn!(
                        organization_id = org,
                        events = early_ids.len(),
                        retried = n,
                        "Polar found events in its future (clock skew?)"
                    );
                }
                if !bad_ids.is_empty() {
                    let n = report_count(
                        jobs,
                        "SELECT meter.delivery_rejected($1, $2, $3, $4)",
                        org,
                        batch,
                        &bad_ids,
                        Some(&message),
                    )
                    .await?;
                    jobs.metrics
                        .events_rejected
                        .fetch_add(n as u64, Ordering::Relaxed);
                    tracing::warn!(organization_id = org, rejected = n, error = %message, "Polar rejected events; resending the rest");
                }
                let rest: Vec<Event> = chunk
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !named.iter().any(|(j, _)| j == i))
                    .map(|(_, e)| e.clone())
                    .collect();
                pending.push(rest);
            }
            Ingest::Failed(Failure::Systemic(cause)) => {
                if jobs.health.systemic(&cause) {
                    tracing::error!(cause = %cause, "Polar is unavailable: delivery paused");
                    jobs.wake.probe.notify_one();
                }
                return pause(jobs, org, batch, &ids, &pending).await;
            }
            Ingest::Failed(Failure::Transient(cause) | Failure::TooLarge(cause)) => {
                if jobs.polar_wide(&cause).await {
                    return pause(jobs, org, batch, &ids, &pending).await;
                }
                report_failure(
                    jobs,
                    "SELECT failed, dropped FROM meter.delivery_failed($1, $2, $3, $4)",
                    org,
                    batch,
                    &ids,
                    &cause,
                )
                .await?;
                tracing::warn!(organization_id = org, events = chunk.len(), error = %cause, "delivery to Polar failed; backing off");
            }
        }
    }
    Ok(Flow::Continue)
}

/// Delivery paused: the chunk in hand and every chunk still pending go back
/// untouched, due again in 5 seconds (the probe decides when delivery resumes).
async fn pause(
    jobs: &Jobs,
    org: &str,
    batch: Uuid,
    ids: &[Uuid],
    pending: &[Vec<Event>],
) -> Result<Flow, JobError> {
    let all: Vec<Uuid> = ids
        .iter()
        .copied()
        .chain(pending.iter().flatten().map(|e| e.0))
        .collect();
    defer(jobs, org, batch, &all, 5).await?;
    Ok(Flow::Paused)
}

/// Back to pending after `secs`, attempts untouched.
async fn defer(
    jobs: &Jobs,
    org: &str,
    batch: Uuid,
    ids: &[Uuid],
    secs: u64,
) -> Result<(), JobError> {
    if ids.is_empty() {
        return Ok(());
    }
    let wait = format!("{secs} seconds");
    let n = report_count(
        jobs,
        "SELECT meter.delivery_deferred($1, $2, $3, $4::text::interval)",
        org,
        batch,
        ids,
        Some(&wait),
    )
    .await?;
    jobs.metrics
        .events_deferred
        .fetch_add(n as u64, Ordering::Relaxed);
    Ok(())
}

async fn report_count(
    jobs: &Jobs,
    sql: &str,
    org: &str,
    batch: Uuid,
    ids: &[Uuid],
    arg: Option<&String>,
) -> Result<i32, JobError> {
    jobs.report(sql, || async {
        let c = jobs.pool.get().await?;
        let row = match arg {
            Some(a) => c.query_one(sql, &[&org, &batch, &ids, a]).await?,
            None => c.query_one(sql, &[&org, &batch, &ids]).await?,
        };
        Ok(row.get(0))
    })
    .await
}

async fn report_failure(
    jobs: &Jobs,
    sql: &str,
    org: &str,
    batch: Uuid,
    ids: &[Uuid],
    error: &str,
) -> Result<(), JobError> {
    let dropped: i32 = jobs
        .report(sql, || async {
            let c = jobs.pool.get().await?;
            Ok(c.query_one(sql, &[&org, &batch, &ids, &error])
                .await?
                .get(1))
        })
        .await?;
    jobs.metrics
        .events_dropped
        .fetch_add(dropped as u64, Ordering::Relaxed);
    Ok(())
}

/// Splits events into runs whose JSON body stays under `limit` bytes.
fn chunks_under(events: &[Event], limit: usize) -> Vec<&[Event]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 16);
    for (i, (_, p)) in events.iter().enumerate() {
        let n = p.to_string().len() + 1;
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
        let events: Vec<Event> = (0..100)
            .map(|i| (Uuid::new_v4(), json!({"n": "x".repeat(90), "i": i})))
            .collect();
        let chunks = chunks_under(&events, 1000);
        assert!(chunks.len() > 10);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 100);
        for c in &chunks {
            let body =
                serde_json::to_vec(&json!({"events": c.iter().map(|e| &e.1).collect::<Vec<_>>()}))
                    .unwrap();
            assert!(body.len() <= 1000, "{}", body.len());
        }
        assert_eq!(chunks_under(&events, usize::MAX).len(), 1);
        assert!(chunks_under(&[], 10).is_empty());
    }
}
