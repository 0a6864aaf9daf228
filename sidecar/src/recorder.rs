//! The recorder: events from HTTP requests into the extension's set-based
//! meter.record_events (store::record), group-committed.
//!
//! Single-event requests are group-committed: requests with the same API key
//! (so the same organization, and under Citus the same shard) queue up, and
//! while up to POLAR_METER_GROUP_COMMIT_CONCURRENCY calls for that key are in
//! flight, new requests wait to ride in the next call. Nobody waits on a
//! timer: at low load each request is its own call; under load a call
//! carries everything that arrived during the previous one. Each request is
//! answered only after the commit that holds its event; an item the database
//! refuses fails alone; requests held in memory are bounded
//! (POLAR_METER_MAX_PENDING_EVENTS, then 503).
use deadpool_postgres::Pool;
use polar_meter_rules::batch::MAX_EVENTS;
use polar_meter_rules::sqlstate::{self, Violation};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

use crate::db::DbError;
use crate::metrics::Metrics;
use crate::problem::Problem;

/// Events that must be waiting before a second (third...) call for the same
/// key starts, or goes on, while another is in flight: a call's fixed cost
/// (key check, a few statements, a commit) is worth paying in parallel only
/// for a group. Fewer wait at most for the call in flight to end.
const EXTRA_CALL_MIN_EVENTS: usize = 8;

/// An event the database accepted: recorded now, or already recorded.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub status: String,
    pub event_id: uuid::Uuid,
}

pub type Outcome = Result<Recorded, Problem>;

struct Item {
    event: Value,
    answer: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct KeyQueue {
    waiting: VecDeque<Item>,
    running: usize,
}

impl KeyQueue {
    /// Whether what waits is worth a call of its own beside `others` calls
    /// in flight: always when none is, else only for a group
    /// (EXTRA_CALL_MIN_EVENTS); fewer ride in a running call's next round.
    fn worth_a_call(&self, others: usize) -> bool {
        !self.waiting.is_empty() && (others == 0 || self.waiting.len() >= EXTRA_CALL_MIN_EVENTS)
    }
}

pub struct Recorder {
    pool: Pool,
    concurrency: usize,
    max_pending: usize,
    pending: AtomicUsize,
    queues: Mutex<HashMap<String, KeyQueue>>,
    metrics: Arc<Metrics>,
}

/// Errors that are the same for every item of a call: the key (shared by
/// all), or the database being away or wrong.
fn whole_call(e: &DbError) -> bool {
    match e {
        DbError::Unavailable(_) | DbError::Internal(_) => true,
        DbError::Sql { code, .. } => [
            sqlstate::KEY_MALFORMED,
            sqlstate::KEY_UNKNOWN,
            sqlstate::KEY_REVOKED,
            sqlstate::KEY_EXPIRED,
            sqlstate::KEY_PERMISSION,
            sqlstate::PERMISSION_NOT_HELD,
            sqlstate::BATCH_ENVELOPE,
        ]
        .contains(&code.as_str()),
    }
}

impl Recorder {
    pub fn new(
        pool: Pool,
        concurrency: usize,
        max_pending: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Recorder {
            pool,
            concurrency: concurrency.max(1),
            max_pending: max_pending.max(1),
            pending: AtomicUsize::new(0),
            queues: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// One meter.record_events call: a result per event, in order.
    async fn call(&self, key: &str, events: &[Value]) -> Result<Vec<Outcome>, DbError> {
        let rows = crate::store::record::record_events(&self.pool, key, events).await?;
        Ok(rows
            .into_iter()
            .map(|r| match r.event_id {
                Some(event_id) if r.status != "error" => Ok(Recorded {
                    status: r.status,
                    event_id,
                }),
                _ => Err(Problem::from_sql(
                    r.sqlstate.as_deref().unwrap_or("XX000"),
                    r.message.as_deref().unwrap_or(""),
                )),
            })
            .collect())
    }

    /// Records events in one call. Items the database could not even store
    /// (a NUL, a number numeric would expand or refuse) are answered here and
    /// never sent, so they cannot fail the call for the others. If the call
    /// still fails as a whole for a reason that is not the same for every
    /// item, each item is tried alone, until an error that is the same for
    /// every item (the key, an outage) answers all that are left.
    /// `events` are as parsed: an item the request's parser refused (a key
    /// found twice) is answered with its violation like any other.
    pub async fn record(&self, key: &str, events: Vec<Result<Value, Violation>>) -> Vec<Outcome> {
        let refused = |v: Violation| Some(Err(Problem::from_sql(v.sqlstate, &v.message)));
        let mut out: Vec<Option<Outcome>> = Vec::with_capacity(events.len());
        let (mut slots, mut storable) = (Vec::new(), Vec::new());
        for (i, ev) in events.into_iter().enumerate() {
            match ev.map(|ev| (polar_meter_rules::batch::unstorable(&ev), ev)) {
                Err(v) | Ok((Some(v), _)) => out.push(refused(v)),
                Ok((None, ev)) => {
                    out.push(None);
                    slots.push(i);
                    storable.push(ev);
                }
            }
        }
        let n = storable.len();
        if n > 0 {
            let results = match self.call(key, &storable).await {
                Ok(rows) => rows,
                Err(e) if whole_call(&e) || n == 1 => {
                    e.log();
                    vec![Err(Problem::from_db(&e)); n]
                }
                Err(e) => {
                    tracing::info!(error = %e, events = n, "a batch failed as a whole; recording its events one by one");
                    self.one_by_one(key, storable).await
                }
            };
            for (i, r) in slots.into_iter().zip(results) {
                out[i] = Some(r);
            }
        }
        let out: Vec<Outcome> = out
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(Problem::internal())))
            .collect();
        for r in out.iter().flatten() {
            let counter = if r.status == "recorded" {
                &self.metrics.events_recorded
            } else {
                &self.metrics.events_already_recorded
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    async fn one_by_one(&self, key: &str, events: Vec<Value>) -> Vec<Outcome> {
        let n = events.len();
        let mut out = Vec::with_capacity(n);
        for ev in events {
            match self.call(key, std::slice::from_ref(&ev)).await {
                Ok(mut r) => out.push(r.pop().unwrap_or_else(|| Err(Problem::internal()))),
                Err(e) => {
                    e.log();
                    let p = Problem::from_db(&e);
                    if whole_call(&e) {
                        // The same for the rest: one answer, no more calls.
                        out.resize(n, Err(p));
                        break;
                    }
                    out.push(Err(p));
                }
            }
        }
        out
    }

    /// Single events held in memory now: waiting for their call, or in it.
    pub fn pending_events(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Records one event through the key's group commit.
    pub async fn record_one(self: &Arc<Self>, key: String, event: Value) -> Outcome {
        // Admitted only below the bound, so the count (and its gauge) never
        // passes it, even for a moment.
        let admitted = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_pending).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            return Err(Problem::overloaded());
        }
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut q = self.queues.lock().unwrap();
            let kq = q.entry(key.clone()).or_default();
            kq.waiting.push_back(Item { event, answer: tx });
            if kq.running < self.concurrency && kq.worth_a_call(kq.running) {
                kq.running += 1;
                true
            } else {
                false
            }
        };
        if lead {
            // A task of its own: the commit goes on even if this client leaves.
            let me = self.clone();
            tokio::spawn(async move { me.flush(key).await });
        }
        rx.await.unwrap_or_else(|_| Err(Problem::internal()))
    }

    async fn flush(self: Arc<Self>, key: String) {
        loop {
            let items: Vec<Item> = {
                let mut q = self.queues.lock().unwrap();
                let Some(kq) = q.get_mut(&key) else { return };
                // This call is one of those running; the others can take
                // what is left.
                if !kq.worth_a_call(kq.running - 1) {
                    kq.running -= 1;
                    if kq.running == 0 {
                        q.remove(&key);
                    }
                    return;
                }
                let n = kq.waiting.len().min(MAX_EVENTS);
                kq.waiting.drain(..n).collect()
            };
            let (events, answers): (Vec<Value>, Vec<oneshot::Sender<Outcome>>) =
                items.into_iter().map(|i| (i.event, i.answer)).unzip();
            self.metrics.group_commits.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .group_commit_events
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            let results = self
                .record(&key, events.into_iter().map(Ok).collect())
                .await;
            self.pending.fetch_sub(answers.len(), Ordering::AcqRel);
            for (answer, r) in answers.into_iter().zip(results) {
                let _ = answer.send(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_beside_others_is_worth_it_only_for_a_group() {
        let mut kq = KeyQueue::default();
        assert!(!kq.worth_a_call(0), "nothing waits");
        let push = |kq: &mut KeyQueue| {
            let (answer, _) = oneshot::channel();
            kq.waiting.push_back(Item {
                event: Value::Null,
                answer,
            });
        };
        push(&mut kq);
        assert!(kq.worth_a_call(0), "alone, one event is a call");
        assert!(!kq.worth_a_call(1));
        while kq.waiting.len() < EXTRA_CALL_MIN_EVENTS {
            push(&mut kq);
        }
        assert!(kq.worth_a_call(1) && kq.worth_a_call(2));
    }

    #[test]
    fn key_errors_and_outages_are_the_same_for_every_item() {
        for code in [
            "PM001", "PM002", "PM003", "PM004", "PM005", "PM006", "PM016",
        ] {
            assert!(
                whole_call(&DbError::Sql {
                    code: code.into(),
                    message: String::new()
                }),
                "{code}"
            );
        }
        for code in ["PM010", "PM013", "PM020", "22P05", "22021"] {
            assert!(
                !whole_call(&DbError::Sql {
                    code: code.into(),
                    message: String::new()
                }),
                "{code}"
            );
        }
        assert!(whole_call(&DbError::Unavailable("x".into())));
    }
}
