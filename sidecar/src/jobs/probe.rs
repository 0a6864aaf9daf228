//! While Polar is unavailable: report it (an alert within a minute, repeated
//! hourly by the database), check Polar every POLAR_METER_PROBE_SECS with one
//! cheap authenticated call, and resume every job on the first success. At
//! start, the same call checks the token before any work is claimed.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

use super::Jobs;
use crate::polar::Failure;
use crate::store::polar_state;

const REPORT_EVERY: Duration = Duration::from_secs(60);

pub async fn run(jobs: Arc<Jobs>, mut stop: watch::Receiver<bool>) {
    if check(&jobs).await.is_ok() {
        tracing::info!("Polar accepted the token");
    }
    let mut last_report: Option<Instant> = None;
    loop {
        if let Some((cause, since)) = jobs.health.paused() {
            jobs.metrics.delivery_paused.store(1, Ordering::Relaxed);
            if last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
                last_report = Some(Instant::now());
                let detail = serde_json::json!({"paused_for_seconds": since.elapsed().as_secs(), "polar_api_url": polar_url(&jobs)});
                if let Err(e) = polar_state::polar_unavailable(&jobs.pool, &cause, &detail).await {
                    tracing::warn!(error = %e, "reporting polar_unavailable failed");
                }
                tracing::error!(cause = %cause, paused_for_seconds = since.elapsed().as_secs(), "Polar unavailable: delivery paused");
            }
            tokio::select! {
                _ = tokio::time::sleep(jobs.s.probe) => {}
                _ = stop.changed() => return,
            }
            if check(&jobs).await.is_ok() && jobs.health.success() {
                jobs.metrics.delivery_paused.store(0, Ordering::Relaxed);
                last_report = None;
                tracing::info!(
                    after_seconds = since.elapsed().as_secs(),
                    "Polar answers again: delivery resumed"
                );
                if let Err(e) = polar_state::polar_available(&jobs.pool).await {
                    tracing::warn!(error = %e, "reporting that Polar is available failed");
                }
                jobs.wake.all();
            }
            continue;
        }
        jobs.metrics.delivery_paused.store(0, Ordering::Relaxed);
        tokio::select! {
            _ = jobs.wake.probe.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn check(jobs: &Jobs) -> Result<(), Failure> {
    let polar = jobs.polar.as_ref().expect("probe runs with a Polar client");
    if let Err(e) = jobs.budget.acquire().await {
        return Err(Failure::Transient(e.to_string()));
    }
    match polar.check_token().await {
        Ok(()) => Ok(()),
        Err(f) => {
            if let Failure::Systemic(cause) = &f {
                if jobs.health.systemic(cause) {
                    tracing::error!(cause = %cause, "Polar is unavailable: delivery paused");
                }
            }
            Err(f)
        }
    }
}

fn polar_url(jobs: &Jobs) -> String {
    jobs.polar
        .as_ref()
        .map(|p| p.base_url())
        .unwrap_or_default()
}
