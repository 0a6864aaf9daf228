//! The background jobs: each one job, each woken by its NOTIFY channel, a
//! timer, and every reconnect, because NOTIFY is only a hint (its payload is
//! never read) and the work itself lives in tables.
//!   listener  LISTEN, and wake-up flags (coalesced: one pending per job)
//!   drain     claim due events per organization, send them, report outcomes
//!   outcome   what an ingest answer calls for (pure: no I/O)
//!   budget    the call budget towards Polar that every sidecar shares
//!   provision create or update organizations' Polar customers
//!   reconcile work reconcile runs (counts, listings, the verdict)
//!   alerts    forward alert rows to the webhook
//!   probe     while Polar is unavailable: alert, check, resume
//!   stats     read the outbox's figures for /metrics
pub mod alerts;
pub mod budget;
pub mod drain;
pub mod listener;
pub mod outcome;
pub mod probe;
pub mod provision;
pub mod reconcile;
pub mod stats;

use deadpool_postgres::Pool;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{watch, Notify};

use crate::db::{DbError, Target};
use crate::metrics::Metrics;
use crate::polar::{Client, Health};
pub use budget::Budget;

/// What went wrong in a job: worth retrying soon (the database or Polar was
/// away), or not until something changes (a refusal, our own mistake).
#[derive(Debug)]
pub enum JobError {
    Retryable(String),
    Permanent(String),
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Retryable(m) => write!(f, "{m} (will retry)"),
            JobError::Permanent(m) => f.write_str(m),
        }
    }
}

impl From<DbError> for JobError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(_) => JobError::Retryable(e.to_string()),
            other => JobError::Permanent(other.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for JobError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::from(e).into()
    }
}

impl From<deadpool_postgres::PoolError> for JobError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        DbError::from(e).into()
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub batch_size: i32,
    pub lease: Duration,
    pub poll: Duration,
    pub probe: Duration,
    pub stats: Duration,
}

/// A job scans at most this often, however many wake-ups arrive: anyone who
/// can connect can NOTIFY thousands of times a second.
pub const MIN_SCAN_GAP: Duration = Duration::from_millis(100);

/// One job's wake-up flag: a wake-up while the job is busy is remembered
/// once, however many arrive (tokio's Notify keeps a single permit), and
/// wake-ups start a scan at most every MIN_SCAN_GAP.
#[derive(Default)]
pub struct Wake {
    notify: Notify,
    last_scan: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Wake {
    pub fn notify_one(&self) {
        self.notify.notify_one();
    }

    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// How long to hold a woken scan so that scans stay MIN_SCAN_GAP apart;
    /// counts this scan as started.
    fn pace(&self, now: std::time::Instant) -> Duration {
        let mut last = self.last_scan.lock().unwrap();
        let wait = last.map_or(Duration::ZERO, |l| {
            (l + MIN_SCAN_GAP).saturating_duration_since(now)
        });
        *last = Some(now + wait);
        wait
    }
}

#[derive(Default)]
pub struct Wakeups {
    pub drain: Wake,
    pub provision: Wake,
    pub reconcile: Wake,
    pub alerts: Wake,
    pub probe: Wake,
}

impl Wakeups {
    pub fn all(&self) {
        self.drain.notify_one();
        self.provision.notify_one();
        self.reconcile.notify_one();
        self.alerts.notify_one();
    }
}

/// What every job shares.
pub struct Jobs {
    pub pool: Pool,
    pub target: Arc<Target>,
    pub polar: Option<Arc<Client>>,
    pub budget: Budget,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub webhook: RwLock<Option<String>>,
    pub s: Settings,
    pub wake: Wakeups,
}

impl Jobs {
    /// Waits for a wake-up or the poll interval; false when stopping.
    pub async fn wait(
        &self,
        what: &Wake,
        every: Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        tokio::select! {
            _ = what.notified() => {}
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return false,
        }
        let hold = what.pace(std::time::Instant::now());
        if hold.is_zero() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(hold) => true,
            _ = stop.changed() => false,
        }
    }

    /// After a transient failure (`cause`): is Polar failing as a whole? When
    /// every recent call failed, one cheap authenticated call that concerns no
    /// organization decides: if it fails too, delivery pauses (and this
    /// failure is not counted against the call's events); if it answers, the
    /// failure was the call's own.
    pub async fn polar_wide(&self, cause: &str) -> bool {
        if !self.health.transient() {
            return false;
        }
        if self.health.is_paused() {
            return true;
        }
        let Some(polar) = &self.polar else {
            return false;
        };
        if self.budget.acquire().await.is_err() {
            return false;
        }
        match polar.check_token().await {
            Ok(()) => {
                self.health.success();
                false
            }
            Err(f) => {
                let why = format!(
                    "every recent Polar call failed (last: {cause}) and a check failed too: {f}"
                );
                if self.health.systemic(&why) {
                    tracing::error!(cause = %why, "Polar is failing as a whole: delivery paused");
                    self.wake.probe.notify_one();
                }
                true
            }
        }
    }
}

/// Spawns every job; they stop when `stop` turns true.
pub fn spawn(jobs: Arc<Jobs>, stop: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut handles = vec![
        tokio::spawn(listener::run(jobs.clone(), stop.clone())),
        tokio::spawn(alerts::run(jobs.clone(), stop.clone())),
        tokio::spawn(stats::run(jobs.clone(), stop.clone())),
    ];
    if jobs.polar.is_some() {
        handles.extend([
            tokio::spawn(probe::run(jobs.clone(), stop.clone())),
            tokio::spawn(drain::run(jobs.clone(), stop.clone())),
            tokio::spawn(provision::run(jobs.clone(), stop.clone())),
            tokio::spawn(reconcile::run(jobs.clone(), stop.clone())),
        ]);
    }
    handles
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn scans_start_at_most_every_min_scan_gap() {
        let w = Wake::default();
        let t0 = Instant::now();
        assert_eq!(w.pace(t0), Duration::ZERO, "the first scan at once");
        assert_eq!(
            w.pace(t0 + Duration::from_millis(30)),
            Duration::from_millis(70)
        );
        // That scan starts at t0 + 100 ms; one asked for at once waits for
        // t0 + 200 ms: a flood never makes more than ten a second.
        assert_eq!(
            w.pace(t0 + Duration::from_millis(30)),
            Duration::from_millis(170)
        );
        assert_eq!(w.pace(t0 + Duration::from_secs(5)), Duration::ZERO);
    }
}
