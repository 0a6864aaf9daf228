//! Reconcile runs: claim one (owned through its row under a lease), ask
//! Polar what the database plans (counts per customer and event name, then
//! listings where counts differ; or the whole window's listing for a full
//! run), hand every answer back as it comes, and let the database compare.
//! An interrupted run resumes where it stopped. A failing Polar makes the
//! run fail a try (reconcile_failed: bounded, then reconcile_failing); an
//! unavailable Polar leaves it to its lease, tries untouched.
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use super::{JobError, Jobs};
use crate::polar::client::EventQuery;
use crate::polar::events::timestamp;
use crate::polar::{Answer, Failure};
use crate::store::reconcile::{self as store, Listed, Pair};

const PAGE: u64 = 100;
const LEASE: Duration = Duration::from_secs(300);

pub async fn run(jobs: Arc<Jobs>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        loop {
            match reconcile_next(&jobs, None, &NoProgress).await {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reconciliation failed");
                    break;
                }
            }
        }
        if !jobs
            .wait(&jobs.wake.reconcile, jobs.s.poll, &mut stop)
            .await
        {
            return;
        }
    }
}

/// Where a long run reports how far it got (the CLI shows it on a terminal).
pub trait Progress: Sync {
    fn step(&self, what: &str);
}

pub struct NoProgress;
impl Progress for NoProgress {
    fn step(&self, _: &str) {}
}

enum Stop {
    /// Polar is unavailable: leave the run to its lease.
    Paused,
    /// This try failed: record it.
    Failed(String),
    /// The answer was larger than we read: ask for less (list pages).
    TooLarge(String),
}

/// Asks Polar, retrying its 429s, pausing on a systemic failure.
async fn ask<T, F, Fut>(jobs: &Jobs, mut call: F) -> Result<Result<T, Stop>, JobError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Answer<T>>,
{
    let mut limited = 0;
    loop {
        jobs.budget.acquire().await?;
        match call().await {
            Answer::Ok(v) => {
                jobs.health.success();
                return Ok(Ok(v));
            }
            Answer::RateLimited(wait) if limited < 10 => {
                jobs.health.success();
                limited += 1;
                jobs.budget.pause(wait).await?;
            }
            Answer::RateLimited(_) => {
                return Ok(Err(Stop::Failed("rate limited too often".into())))
            }
            Answer::Failed(Failure::Systemic(cause)) => {
                if jobs.health.systemic(&cause) {
                    jobs.wake.probe.notify_one();
                }
                return Ok(Err(Stop::Paused));
            }
            Answer::Failed(Failure::Transient(cause)) => {
                if jobs.polar_wide(&cause).await {
                    return Ok(Err(Stop::Paused));
                }
                return Ok(Err(Stop::Failed(cause)));
            }
            // Polar answered, at length: not a failure of Polar's.
            Answer::Failed(Failure::TooLarge(cause)) => return Ok(Err(Stop::TooLarge(cause))),
        }
    }
}

/// Works one run (the oldest due, or `only`) to its verdict. Returns the
/// result, or None when no run was due (or Polar is unavailable).
pub async fn reconcile_next(
    jobs: &Jobs,
    only: Option<i64>,
    progress: &dyn Progress,
) -> Result<Option<Value>, JobError> {
    if jobs.health.is_paused() {
        return Ok(None);
    }
    let Some(run) = store::claim_reconcile_run(&jobs.pool, LEASE, only).await? else {
        return Ok(None);
    };
    let (id, mode) = (run.id, run.mode.as_str());
    // Polar's bounds are exclusive: a microsecond earlier makes [start, end).
    let from = timestamp(run.window_start - chrono::Duration::microseconds(1));
    let to = timestamp(run.window_end);
    tracing::info!(run_id = id, window_start = %timestamp(run.window_start), window_end = %to, mode, "reconciling");
    match work(jobs, id, mode, &from, &to, progress).await? {
        Ok(()) => {}
        Err(Stop::Paused) => {
            tracing::warn!(
                run_id = id,
                "Polar is unavailable: the run waits (its lease lapses, its tries are untouched)"
            );
            return Ok(None);
        }
        Err(Stop::Failed(e) | Stop::TooLarge(e)) => {
            let status = store::reconcile_failed(&jobs.pool, id, &e).await?;
            return Err(JobError::Retryable(format!(
                "reconcile run {id}: {e} (now {})",
                status.as_deref().unwrap_or("not running")
            )));
        }
    }
    progress.step(&format!("run {id}: comparing"));
    let result = store::reconcile_finish(&jobs.pool, id).await?;
    let (drift, missing, unexpected) = (
        result["drift"].as_i64().unwrap_or(0),
        result["missing_at_polar"]["count"].as_i64().unwrap_or(0),
        result["unexpected_at_polar"]["count"].as_i64().unwrap_or(0),
    );
    if drift > 0 || missing > 0 || unexpected > 0 {
        tracing::warn!(run_id = id, drift, missing, unexpected, healed = %result["healed"],
            max_customer_drift_ratio = %result["max_customer_drift_ratio"], backlog = %result["backlog"],
            "reconciliation found drift");
    } else {
        tracing::info!(run_id = id, mode = %result["mode"], local_sent = %result["local_sent"], healed = %result["healed"],
            pairs_listed = %result["pairs_listed"], backlog = %result["backlog"], "reconciliation clean");
    }
    Ok(Some(result))
}

async fn work(
    jobs: &Jobs,
    id: i64,
    mode: &str,
    from: &str,
    to: &str,
    progress: &dyn Progress,
) -> Result<Result<(), Stop>, JobError> {
    let polar = jobs
        .polar
        .as_ref()
        .expect("reconcile runs with a Polar client");
    if mode == "counts" {
        let todo: Vec<Pair> = store::reconcile_count_plan(&jobs.pool, id)
            .await?
            .into_iter()
            .filter(|p| p.remote.is_none())
            .collect();
        let mut counted = Vec::new();
        for (i, pair) in todo.iter().enumerate() {
            let q = EventQuery {
                start: from,
                end: to,
                customer: pair.organization_id.as_deref(),
                name: pair.event_name.as_deref(),
            };
            let qr = &q;
            let n = match ask(jobs, move || polar.count_events(qr)).await? {
                Ok(n) => n,
                Err(stop) => return Ok(Err(stop)),
            };
            counted.push(Pair {
                organization_id: pair.organization_id.clone(),
                event_name: pair.event_name.clone(),
                remote: Some(i64::try_from(n).unwrap_or(i64::MAX)),
            });
            if counted.len() >= 50 || i + 1 == todo.len() {
                store::reconcile_add_counts(&jobs.pool, id, &std::mem::take(&mut counted)).await?;
                progress.step(&format!(
                    "run {id}: counted {} of {} pairs",
                    i + 1,
                    todo.len()
                ));
            }
        }
    }
    let listings = store::reconcile_list_plan(&jobs.pool, id).await?;
    for (n, l) in listings.iter().enumerate() {
        let (org, name, done) = (&l.organization_id, &l.event_name, l.pages_done);
        let q = EventQuery {
            start: from,
            end: to,
            customer: org.as_deref(),
            name: name.as_deref(),
        };
        let mut page = done as u64 + 1;
        loop {
            let max_page = match list_page(jobs, id, &q, (org, name), page).await? {
                Ok(m) => m,
                Err(stop) => return Ok(Err(stop)),
            };
            progress.step(&format!(
                "run {id}: listing {} of {}: page {page} of {}",
                n + 1,
                listings.len(),
                max_page.max(1)
            ));
            if page >= max_page {
                break;
            }
            page += 1;
        }
    }
    Ok(Ok(()))
}

/// Smaller pages to read page `page` of PAGE events in, in turn, when
/// Polar's answer for it passes the bytes we read of one answer (one
/// organization's events can carry up to 49 metadata values of 500
/// characters each): so one tenant's data never fails another's run.
const SHRINK: [u64; 3] = [4, 20, 100];

/// Lists page `page` (PAGE events) of a listing into the run; returns
/// Polar's page count. A page too large to read is read again as SHRINK[i]
/// smaller pages covering the same events, each reported as it comes (the
/// run's progress moves to `page` with the last of them).
async fn list_page(
    jobs: &Jobs,
    id: i64,
    q: &EventQuery<'_>,
    (org, name): (&Option<String>, &Option<String>),
    page: u64,
) -> Result<Result<u64, Stop>, JobError> {
    let polar = jobs.polar.as_ref().expect("a Polar client");
    let report = |items: Vec<Listed>, as_page: u64| async move {
        if items.is_empty() {
            return Ok::<_, JobError>(());
        }
        store::reconcile_add_listed(&jobs.pool, id, (org, name), as_page as i32, &items).await?;
        Ok(())
    };
    let mut last_cause = String::new();
    for parts in std::iter::once(1).chain(SHRINK) {
        let limit = PAGE / parts;
        let mut max_page = 0;
        let mut too_large = None;
        for sub in 0..parts {
            let sub_page = (page - 1) * parts + sub + 1;
            match ask(jobs, move || polar.list_events(q, sub_page, limit)).await? {
                Ok(p) => {
                    // Progress moves to `page` only with its last part.
                    let as_page = if sub + 1 == parts { page } else { page - 1 };
                    max_page = p.max_page.div_ceil(parts);
                    let done = sub_page >= p.max_page;
                    report(p.items, if done { page } else { as_page }).await?;
                    if done {
                        break;
                    }
                }
                Err(Stop::TooLarge(cause)) => {
                    too_large = Some(cause);
                    break;
                }
                Err(stop) => return Ok(Err(stop)),
            }
        }
        match too_large {
            None => return Ok(Ok(max_page)),
            Some(cause) => {
                tracing::info!(
                    run_id = id,
                    page,
                    limit,
                    cause,
                    "a page of Polar's events was too large; reading it in smaller pages"
                );
                last_cause = cause;
            }
        }
    }
    Ok(Err(Stop::Failed(last_cause)))
}
