//! Prometheus text exposition, kept in-process: HTTP requests and latency,
//! the pools, recording, Polar calls and their outcomes, delivery results,
//! alerts forwarded, whether delivery is paused, and the outbox as the
//! database last reported it (read on a timer, never per scrape).
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    polar_calls: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    pub events_recorded: AtomicU64,
    pub events_already_recorded: AtomicU64,
    pub group_commits: AtomicU64,
    pub group_commit_events: AtomicU64,
    pub events_delivered: AtomicU64,
    pub events_rejected: AtomicU64,
    pub events_dropped: AtomicU64,
    pub events_deferred: AtomicU64,
    pub alerts_forwarded: AtomicU64,
    pub alert_forward_failures: AtomicU64,
    pub delivery_paused: AtomicU64,
    /// Connections (or proxied requests) refused because their client had
    /// POLAR_METER_MAX_CONNECTIONS_PER_CLIENT.
    pub connections_refused: AtomicU64,
    /// meter.outbox_stats() as last read, and when (unix seconds).
    outbox: Mutex<Option<(Value, f64)>>,
}

pub struct PoolUsage {
    pub name: &'static str,
    pub max: usize,
    pub size: usize,
    pub available: usize,
    pub waiting: usize,
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

impl Metrics {
    /// `route` is the route's pattern (never the raw path), so cardinality is fixed.
    pub fn observe(&self, route: &'static str, status: u16, secs: f64) {
        *self
            .requests
            .lock()
            .unwrap()
            .entry((route, status))
            .or_default() += 1;
        let mut lat = self.latency.lock().unwrap();
        let h = lat.entry(route).or_default();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            h.counts[i] += 1;
        }
        h.sum += secs;
        h.count += 1;
    }

    /// One Polar call: `endpoint` is the operation's pattern, `outcome` one of
    /// 2xx, 3xx, 4xx, 422, 429, 5xx, transport.
    pub fn polar_call(&self, endpoint: &'static str, outcome: &'static str) {
        *self
            .polar_calls
            .lock()
            .unwrap()
            .entry((endpoint, outcome))
            .or_default() += 1;
    }

    pub fn set_outbox(&self, stats: Value) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        *self.outbox.lock().unwrap() = Some((stats, now));
    }

    /// `batches_in_progress`: batch slots taken, read off the semaphore;
    /// `pending_events`: single events the group commit holds in memory.
    pub fn render(
        &self,
        pools: &[PoolUsage],
        batches_in_progress: usize,
        pending_events: usize,
        body_bytes: usize,
    ) -> String {
        let mut out = String::with_capacity(8192);
        head(
            &mut out,
            "polar_meter_http_requests_total",
            "counter",
            "HTTP requests by route and status.",
        );
        for ((route, status), n) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "polar_meter_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        head(
            &mut out,
            "polar_meter_http_request_duration_seconds",
            "histogram",
            "Request latency by route.",
        );
        for (route, h) in self.latency.lock().unwrap().iter() {
            let mut cum = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cum += h.counts[i];
                let _ = writeln!(out, "polar_meter_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {cum}");
            }
            let _ = writeln!(out, "polar_meter_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(
                out,
                "polar_meter_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "polar_meter_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        head(
            &mut out,
            "polar_meter_events_total",
            "counter",
            "Events answered by the recording endpoints, by outcome.",
        );
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "polar_meter_events_total{{status=\"recorded\"}} {}",
            load(&self.events_recorded)
        );
        let _ = writeln!(
            out,
            "polar_meter_events_total{{status=\"already_recorded\"}} {}",
            load(&self.events_already_recorded)
        );
        head(
            &mut out,
            "polar_meter_group_commits_total",
            "counter",
            "Recording calls made for single-event requests (each may hold many).",
        );
        let _ = writeln!(
            out,
            "polar_meter_group_commits_total {}",
            load(&self.group_commits)
        );
        head(
            &mut out,
            "polar_meter_group_commit_events_total",
            "counter",
            "Single-event requests recorded through group commits.",
        );
        let _ = writeln!(
            out,
            "polar_meter_group_commit_events_total {}",
            load(&self.group_commit_events)
        );
        head(
            &mut out,
            "polar_meter_group_commit_pending_events",
            "gauge",
            "Single-event requests held for their group commit, waiting or in a call (at most POLAR_METER_MAX_PENDING_EVENTS).",
        );
        let _ = writeln!(
            out,
            "polar_meter_group_commit_pending_events {pending_events}"
        );
        head(
            &mut out,
            "polar_meter_batches_in_progress",
            "gauge",
            "Batch requests being read, parsed or recorded (at most POLAR_METER_BATCH_CONCURRENCY).",
        );
        let _ = writeln!(out, "polar_meter_batches_in_progress {batches_in_progress}");
        head(
            &mut out,
            "polar_meter_http_body_bytes_in_use",
            "gauge",
            "Bytes of request bodies being read, all connections together (at most POLAR_METER_BODY_BUDGET_BYTES).",
        );
        let _ = writeln!(out, "polar_meter_http_body_bytes_in_use {body_bytes}");
        head(
            &mut out,
            "polar_meter_http_connections_refused_total",
            "counter",
            "Connections (or requests through a trusted proxy) refused because their client address had POLAR_METER_MAX_CONNECTIONS_PER_CLIENT.",
        );
        let _ = writeln!(
            out,
            "polar_meter_http_connections_refused_total {}",
            load(&self.connections_refused)
        );
        head(
            &mut out,
            "polar_meter_polar_requests_total",
            "counter",
            "Calls to Polar by endpoint and outcome (2xx, 3xx, 4xx, 422, 429, 5xx, transport).",
        );
        for ((endpoint, outcome), n) in self.polar_calls.lock().unwrap().iter() {
            let _ = writeln!(out, "polar_meter_polar_requests_total{{endpoint=\"{endpoint}\",outcome=\"{outcome}\"}} {n}");
        }
        head(
            &mut out,
            "polar_meter_delivery_events_total",
            "counter",
            "Events this process reported to the outbox, by result.",
        );
        for (result, n) in [
            ("delivered", load(&self.events_delivered)),
            ("rejected", load(&self.events_rejected)),
            ("dropped", load(&self.events_dropped)),
            ("deferred", load(&self.events_deferred)),
        ] {
            let _ = writeln!(
                out,
                "polar_meter_delivery_events_total{{result=\"{result}\"}} {n}"
            );
        }
        head(
            &mut out,
            "polar_meter_delivery_paused",
            "gauge",
            "1 while this process pauses delivery because Polar is unavailable.",
        );
        let _ = writeln!(
            out,
            "polar_meter_delivery_paused {}",
            load(&self.delivery_paused)
        );
        head(
            &mut out,
            "polar_meter_alerts_forwarded_total",
            "counter",
            "Alerts this process forwarded (to the webhook, or to its log without one).",
        );
        let _ = writeln!(
            out,
            "polar_meter_alerts_forwarded_total {}",
            load(&self.alerts_forwarded)
        );
        head(
            &mut out,
            "polar_meter_alert_forward_failures_total",
            "counter",
            "Webhook calls that failed (each alert is retried).",
        );
        let _ = writeln!(
            out,
            "polar_meter_alert_forward_failures_total {}",
            load(&self.alert_forward_failures)
        );
        self.render_outbox(&mut out);
        head(
            &mut out,
            "polar_meter_db_pool_connections",
            "gauge",
            "Database pool connections by pool and state.",
        );
        for p in pools {
            for (state, n) in [
                ("max", p.max),
                ("open", p.size),
                ("idle", p.available),
                ("in_use", p.size.saturating_sub(p.available)),
            ] {
                let _ = writeln!(
                    out,
                    "polar_meter_db_pool_connections{{pool=\"{}\",state=\"{state}\"}} {n}",
                    p.name
                );
            }
        }
        head(
            &mut out,
            "polar_meter_db_pool_waiting",
            "gauge",
            "Callers waiting for a database connection, by pool.",
        );
        for p in pools {
            let _ = writeln!(
                out,
                "polar_meter_db_pool_waiting{{pool=\"{}\"}} {}",
                p.name, p.waiting
            );
        }
        out
    }

    fn render_outbox(&self, out: &mut String) {
        let guard = self.outbox.lock().unwrap();
        let Some((s, at)) = guard.as_ref() else {
            return;
        };
        let num = |v: &Value| v.as_f64().unwrap_or(0.0);
        head(out, "polar_meter_outbox_events", "gauge", "Events by delivery status (pending, in_flight, failed, dropped, rejected), as last read from the database.");
        for status in ["pending", "in_flight", "failed", "dropped", "rejected"] {
            let _ = writeln!(
                out,
                "polar_meter_outbox_events{{status=\"{status}\"}} {}",
                num(&s["backlog"][status])
            );
        }
        for (name, help, v) in [
            (
                "polar_meter_outbox_oldest_due_age_seconds",
                "Age of the oldest due event of an organization with a Polar customer.",
                &s["oldest_due_age_seconds"],
            ),
            (
                "polar_meter_outbox_waiting_for_customer_events",
                "Events waiting for their organization's Polar customer.",
                &s["waiting_for_customer"],
            ),
            (
                "polar_meter_alerts_pending",
                "Alerts raised and not yet forwarded.",
                &s["alerts_pending"],
            ),
            (
                "polar_meter_alerts_failed",
                "Alerts given up after alert_max_tries.",
                &s["alerts_failed"],
            ),
            (
                "polar_meter_audit_unsealed_rows",
                "Audit rows waiting for the sealer.",
                &s["audit_unsealed"],
            ),
            (
                "polar_meter_reconcile_failed_runs",
                "Reconcile runs that ended failed.",
                &s["reconcile_failed"],
            ),
        ] {
            head(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {}", num(v));
        }
        head(
            out,
            "polar_meter_alerts_raised_total",
            "counter",
            "Alerts ever raised in this database.",
        );
        let _ = writeln!(
            out,
            "polar_meter_alerts_raised_total {}",
            num(&s["alerts_total"])
        );
        let run = &s["last_reconcile"];
        if run.is_object() {
            for (name, help, v) in [
                (
                    "polar_meter_reconcile_last_age_seconds",
                    "Seconds since the last reconcile run finished.",
                    &run["age_seconds"],
                ),
                (
                    "polar_meter_reconcile_last_drift",
                    "Drift (events) found by the last finished reconcile run.",
                    &run["drift"],
                ),
                (
                    "polar_meter_reconcile_last_drift_ratio",
                    "Drift ratio of the last finished reconcile run.",
                    &run["drift_ratio"],
                ),
            ] {
                head(out, name, "gauge", help);
                let _ = writeln!(out, "{name} {}", num(v));
            }
        }
        head(
            out,
            "polar_meter_outbox_stats_timestamp_seconds",
            "gauge",
            "When these outbox figures were read (unix time).",
        );
        let _ = writeln!(out, "polar_meter_outbox_stats_timestamp_seconds {at}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_counts_match() {
        let m = Metrics::default();
        m.observe("POST /api/v1/meter", 202, 0.0007);
        m.observe("POST /api/v1/meter", 202, 0.02);
        m.observe("POST /api/v1/meter", 400, 9.0);
        let text = m.render(
            &[PoolUsage {
                name: "requests",
                max: 4,
                size: 2,
                available: 1,
                waiting: 0,
            }],
            3,
            7,
            1024,
        );
        assert!(text.contains(
            "polar_meter_http_requests_total{route=\"POST /api/v1/meter\",status=\"202\"} 2"
        ));
        assert!(text.contains("le=\"0.001\"} 1\n"));
        assert!(text.contains("le=\"0.025\"} 2\n"));
        assert!(text.contains("le=\"5\"} 2\n"));
        assert!(text.contains("le=\"+Inf\"} 3\n"));
        assert!(
            text.contains("polar_meter_db_pool_connections{pool=\"requests\",state=\"in_use\"} 1")
        );
        assert!(text.contains("\npolar_meter_batches_in_progress 3\n"));
        assert!(text.contains("\npolar_meter_http_body_bytes_in_use 1024\n"));
        assert!(text.contains("\npolar_meter_group_commit_pending_events 7\n"));
    }

    #[test]
    fn delivery_and_outbox_figures_are_exposed() {
        let m = Metrics::default();
        m.polar_call("POST /v1/events/ingest", "2xx");
        m.polar_call("POST /v1/events/ingest", "2xx");
        m.polar_call("POST /v1/events/ingest", "429");
        m.events_delivered.fetch_add(7, Ordering::Relaxed);
        m.set_outbox(serde_json::json!({"backlog": {"pending": 3, "dropped": 1}, "oldest_due_age_seconds": 12.5,
            "last_reconcile": {"age_seconds": 60, "drift": 2, "drift_ratio": 0.5}}));
        let text = m.render(&[], 0, 0, 0);
        assert!(text.contains("polar_meter_polar_requests_total{endpoint=\"POST /v1/events/ingest\",outcome=\"2xx\"} 2"));
        assert!(text.contains("polar_meter_delivery_events_total{result=\"delivered\"} 7"));
        assert!(text.contains("polar_meter_outbox_events{status=\"pending\"} 3"));
        assert!(text.contains("polar_meter_outbox_events{status=\"in_flight\"} 0"));
        assert!(text.contains("polar_meter_outbox_oldest_due_age_seconds 12.5"));
        assert!(text.contains("polar_meter_reconcile_last_drift 2"));
        assert!(text.contains("polar_meter_delivery_paused 0"));
    }
}
