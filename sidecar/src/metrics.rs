//! Prometheus text exposition, kept in-process: HTTP requests and latency,
//! the pools, recording, Polar calls and their outcomes, delivery results,
//! alerts forwarded, whether delivery is paused, and the outbox as the
//! database last reported it (read on a timer, never per scrape).
use crate::store::stats::{LastReconcile, OutboxStats};
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
    outbox: Mutex<Option<(OutboxStats, f64)>>,
}

pub struct PoolUsage {
    pub name: &'static str,
    pub max: usize,
    pub size: usize,
    pub available: usize,
    pub waiting: usize,
}

/// What a scrape reads off the process besides the counters.
#[derive(Default)]
pub struct Now<'a> {
    pub pools: &'a [PoolUsage],
    /// Batch slots taken, read off the semaphore.
    pub batches_in_progress: usize,
    /// Single events the group commit holds in memory.
    pub pending_events: usize,
    pub body_bytes: usize,
}

/// Everything one family's samples are read from.
struct Sources<'a> {
    m: &'a Metrics,
    now: &'a Now<'a>,
    /// meter.outbox_stats() as last read, and when; None before the first read.
    outbox: Option<&'a (OutboxStats, f64)>,
}

/// One sample: a suffix of the family's name (a histogram's _bucket, _sum,
/// _count), its labels rendered without braces, its value.
type Sample = (&'static str, String, f64);

/// One metric family: name, type, help, and where its samples come from.
/// A family without samples is left out (the database's figures before the
/// first read, the last reconcile run's before one finished).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: fn(&Sources) -> Vec<Sample>,
}

fn one(v: f64) -> Vec<Sample> {
    vec![("", String::new(), v)]
}

fn load(a: &AtomicU64) -> f64 {
    a.load(Ordering::Relaxed) as f64
}

fn labelled<K: std::fmt::Display>(label: &str, values: &[(K, f64)]) -> Vec<Sample> {
    values
        .iter()
        .map(|(k, v)| ("", format!("{label}=\"{k}\""), *v))
        .collect()
}

fn outbox(s: &Sources, f: fn(&OutboxStats) -> f64) -> Vec<Sample> {
    s.outbox.map(|(o, _)| one(f(o))).unwrap_or_default()
}

fn last_run(s: &Sources, f: fn(&LastReconcile) -> f64) -> Vec<Sample> {
    s.outbox
        .and_then(|(o, _)| o.last_reconcile.as_ref())
        .map(|r| one(f(r)))
        .unwrap_or_default()
}

fn pools(s: &Sources) -> Vec<Sample> {
    let mut out = Vec::new();
    for p in s.now.pools {
        for (state, n) in [
            ("max", p.max),
            ("open", p.size),
            ("idle", p.available),
            ("in_use", p.size.saturating_sub(p.available)),
        ] {
            out.push((
                "",
                format!("pool=\"{}\",state=\"{state}\"", p.name),
                n as f64,
            ));
        }
    }
    out
}

fn latency(s: &Sources) -> Vec<Sample> {
    let mut out = Vec::new();
    for (route, h) in s.m.latency.lock().unwrap().iter() {
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += h.counts[i];
            out.push((
                "_bucket",
                format!("route=\"{route}\",le=\"{b}\""),
                cum as f64,
            ));
        }
        let route = format!("route=\"{route}\"");
        out.push(("_bucket", format!("{route},le=\"+Inf\""), h.count as f64));
        out.push(("_sum", route.clone(), h.sum));
        out.push(("_count", route, h.count as f64));
    }
    out
}

/// Every metric /metrics exports, in order. Names and types are a contract
/// (dashboards, alerting rules): a unit test holds them to a golden list.
const FAMILIES: &[Family] = &[
    Family {
        name: "polar_meter_http_requests_total",
        kind: "counter",
        help: "HTTP requests by route and status.",
        samples: |s| {
            let r = s.m.requests.lock().unwrap();
            r.iter()
                .map(|((route, status), n)| ("", format!("route=\"{route}\",status=\"{status}\""), *n as f64))
                .collect()
        },
    },
    Family {
        name: "polar_meter_http_request_duration_seconds",
        kind: "histogram",
        help: "Request latency by route.",
        samples: latency,
    },
    Family {
        name: "polar_meter_events_total",
        kind: "counter",
        help: "Events answered by the recording endpoints, by outcome.",
        samples: |s| {
            labelled("status", &[
                ("recorded", load(&s.m.events_recorded)),
                ("already_recorded", load(&s.m.events_already_recorded)),
            ])
        },
    },
    Family {
        name: "polar_meter_group_commits_total",
        kind: "counter",
        help: "Recording calls made for single-event requests (each may hold many).",
        samples: |s| one(load(&s.m.group_commits)),
    },
    Family {
        name: "polar_meter_group_commit_events_total",
        kind: "counter",
        help: "Single-event requests recorded through group commits.",
        samples: |s| one(load(&s.m.group_commit_events)),
    },
    Family {
        name: "polar_meter_group_commit_pending_events",
        kind: "gauge",
        help: "Single-event requests held for their group commit, waiting or in a call (at most POLAR_METER_MAX_PENDING_EVENTS).",
        samples: |s| one(s.now.pending_events as f64),
    },
    Family {
        name: "polar_meter_batches_in_progress",
        kind: "gauge",
        help: "Batch requests being read, parsed or recorded (at most POLAR_METER_BATCH_CONCURRENCY).",
        samples: |s| one(s.now.batches_in_progress as f64),
    },
    Family {
        name: "polar_meter_http_body_bytes_in_use",
        kind: "gauge",
        help: "Bytes of request bodies being read, all connections together (at most POLAR_METER_BODY_BUDGET_BYTES).",
        samples: |s| one(s.now.body_bytes as f64),
    },
    Family {
        name: "polar_meter_http_connections_refused_total",
        kind: "counter",
        help: "Connections (or requests through a trusted proxy) refused because their client address had POLAR_METER_MAX_CONNECTIONS_PER_CLIENT.",
        samples: |s| one(load(&s.m.connections_refused)),
    },
    Family {
        name: "polar_meter_polar_requests_total",
        kind: "counter",
        help: "Calls to Polar by endpoint and outcome (2xx, 3xx, 4xx, 422, 429, 5xx, transport).",
        samples: |s| {
            let calls = s.m.polar_calls.lock().unwrap();
            calls
                .iter()
                .map(|((endpoint, outcome), n)| ("", format!("endpoint=\"{endpoint}\",outcome=\"{outcome}\""), *n as f64))
                .collect()
        },
    },
    Family {
        name: "polar_meter_delivery_events_total",
        kind: "counter",
        help: "Events this process reported to the outbox, by result.",
        samples: |s| {
            labelled("result", &[
                ("delivered", load(&s.m.events_delivered)),
                ("rejected", load(&s.m.events_rejected)),
                ("dropped", load(&s.m.events_dropped)),
                ("deferred", load(&s.m.events_deferred)),
            ])
        },
    },
    Family {
        name: "polar_meter_delivery_paused",
        kind: "gauge",
        help: "1 while this process pauses delivery because Polar is unavailable.",
        samples: |s| one(load(&s.m.delivery_paused)),
    },
    Family {
        name: "polar_meter_alerts_forwarded_total",
        kind: "counter",
        help: "Alerts this process forwarded (to the webhook, or to its log without one).",
        samples: |s| one(load(&s.m.alerts_forwarded)),
    },
    Family {
        name: "polar_meter_alert_forward_failures_total",
        kind: "counter",
        help: "Webhook calls that failed (each alert is retried).",
        samples: |s| one(load(&s.m.alert_forward_failures)),
    },
    Family {
        name: "polar_meter_outbox_events",
        kind: "gauge",
        help: "Events by delivery status (pending, in_flight, failed, dropped, rejected), as last read from the database.",
        samples: |s| {
            let Some((o, _)) = s.outbox else { return vec![] };
            let b = &o.backlog;
            labelled("status", &[
                ("pending", b.pending as f64),
                ("in_flight", b.in_flight as f64),
                ("failed", b.failed as f64),
                ("dropped", b.dropped as f64),
                ("rejected", b.rejected as f64),
            ])
        },
    },
    Family {
        name: "polar_meter_outbox_oldest_due_age_seconds",
        kind: "gauge",
        help: "Age of the oldest due event of an organization with a Polar customer.",
        samples: |s| outbox(s, |o| o.oldest_due_age_seconds),
    },
    Family {
        name: "polar_meter_outbox_waiting_for_customer_events",
        kind: "gauge",
        help: "Events waiting for their organization's Polar customer.",
        samples: |s| outbox(s, |o| o.waiting_for_customer as f64),
    },
    Family {
        name: "polar_meter_alerts_pending",
        kind: "gauge",
        help: "Alerts raised and not yet forwarded.",
        samples: |s| outbox(s, |o| o.alerts_pending as f64),
    },
    Family {
        name: "polar_meter_alerts_failed",
        kind: "gauge",
        help: "Alerts given up after alert_max_tries.",
        samples: |s| outbox(s, |o| o.alerts_failed as f64),
    },
    Family {
        name: "polar_meter_audit_unsealed_rows",
        kind: "gauge",
        help: "Audit rows waiting for the sealer.",
        samples: |s| outbox(s, |o| o.audit_unsealed as f64),
    },
    Family {
        name: "polar_meter_reconcile_failed_runs",
        kind: "gauge",
        help: "Reconcile runs that ended failed.",
        samples: |s| outbox(s, |o| o.reconcile_failed as f64),
    },
    Family {
        name: "polar_meter_alerts_raised_total",
        kind: "counter",
        help: "Alerts ever raised in this database.",
        samples: |s| outbox(s, |o| o.alerts_total as f64),
    },
    Family {
        name: "polar_meter_reconcile_last_age_seconds",
        kind: "gauge",
        help: "Seconds since the last reconcile run finished.",
        samples: |s| last_run(s, |r| r.age_seconds),
    },
    Family {
        name: "polar_meter_reconcile_last_drift",
        kind: "gauge",
        help: "Drift (events) found by the last finished reconcile run.",
        samples: |s| last_run(s, |r| r.drift.unwrap_or(0) as f64),
    },
    Family {
        name: "polar_meter_reconcile_last_drift_ratio",
        kind: "gauge",
        help: "Drift ratio of the last finished reconcile run.",
        samples: |s| last_run(s, |r| r.drift_ratio.unwrap_or(0.0)),
    },
    Family {
        name: "polar_meter_outbox_stats_timestamp_seconds",
        kind: "gauge",
        help: "When these outbox figures were read (unix time).",
        samples: |s| s.outbox.map(|(_, at)| one(*at)).unwrap_or_default(),
    },
    Family {
        name: "polar_meter_db_pool_connections",
        kind: "gauge",
        help: "Database pool connections by pool and state.",
        samples: pools,
    },
    Family {
        name: "polar_meter_db_pool_waiting",
        kind: "gauge",
        help: "Callers waiting for a database connection, by pool.",
        samples: |s| {
            s.now.pools.iter().map(|p| ("", format!("pool=\"{}\"", p.name), p.waiting as f64)).collect()
        },
    },
];

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

    pub fn set_outbox(&self, stats: OutboxStats) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        *self.outbox.lock().unwrap() = Some((stats, now));
    }

    /// The Prometheus text exposition of FAMILIES.
    pub fn render(&self, now: &Now) -> String {
        let outbox = self.outbox.lock().unwrap();
        let sources = Sources {
            m: self,
            now,
            outbox: outbox.as_ref(),
        };
        let mut out = String::with_capacity(8192);
        for f in FAMILIES {
            let samples = (f.samples)(&sources);
            if samples.is_empty() {
                continue;
            }
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            for (suffix, labels, v) in samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{}{suffix} {v}", f.name);
                } else {
                    let _ = writeln!(out, "{}{suffix}{{{labels}}} {v}", f.name);
                }
            }
        }
        out
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
        let text = m.render(&Now {
            pools: &[PoolUsage {
                name: "requests",
                max: 4,
                size: 2,
                available: 1,
                waiting: 0,
            }],
            batches_in_progress: 3,
            pending_events: 7,
            body_bytes: 1024,
        });
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
        m.set_outbox(OutboxStats {
            backlog: crate::store::stats::Backlog {
                pending: 3,
                dropped: 1,
                ..Default::default()
            },
            oldest_due_age_seconds: 12.5,
            last_reconcile: Some(LastReconcile {
                run_id: 1,
                finished_at: String::new(),
                window_end: String::new(),
                age_seconds: 60.0,
                drift: Some(2),
                drift_ratio: Some(0.5),
                mode: "counts".into(),
            }),
            ..Default::default()
        });
        let text = m.render(&Now::default());
        assert!(text.contains("polar_meter_polar_requests_total{endpoint=\"POST /v1/events/ingest\",outcome=\"2xx\"} 2"));
        assert!(text.contains("polar_meter_delivery_events_total{result=\"delivered\"} 7"));
        assert!(text.contains("polar_meter_outbox_events{status=\"pending\"} 3"));
        assert!(text.contains("polar_meter_outbox_events{status=\"in_flight\"} 0"));
        assert!(text.contains("polar_meter_outbox_oldest_due_age_seconds 12.5"));
        assert!(text.contains("polar_meter_reconcile_last_drift 2"));
        assert!(text.contains("polar_meter_delivery_paused 0"));
    }

    /// The names and types /metrics exports, as dashboards and alerting
    /// rules know them: a family renamed, retyped or lost fails here.
    #[test]
    fn every_family_keeps_its_name_and_type() {
        const GOLDEN: &[(&str, &str)] = &[
            ("polar_meter_http_requests_total", "counter"),
            ("polar_meter_http_request_duration_seconds", "histogram"),
            ("polar_meter_events_total", "counter"),
            ("polar_meter_group_commits_total", "counter"),
            ("polar_meter_group_commit_events_total", "counter"),
            ("polar_meter_group_commit_pending_events", "gauge"),
            ("polar_meter_batches_in_progress", "gauge"),
            ("polar_meter_http_body_bytes_in_use", "gauge"),
            ("polar_meter_http_connections_refused_total", "counter"),
            ("polar_meter_polar_requests_total", "counter"),
            ("polar_meter_delivery_events_total", "counter"),
            ("polar_meter_delivery_paused", "gauge"),
            ("polar_meter_alerts_forwarded_total", "counter"),
            ("polar_meter_alert_forward_failures_total", "counter"),
            ("polar_meter_outbox_events", "gauge"),
            ("polar_meter_outbox_oldest_due_age_seconds", "gauge"),
            ("polar_meter_outbox_waiting_for_customer_events", "gauge"),
            ("polar_meter_alerts_pending", "gauge"),
            ("polar_meter_alerts_failed", "gauge"),
            ("polar_meter_audit_unsealed_rows", "gauge"),
            ("polar_meter_reconcile_failed_runs", "gauge"),
            ("polar_meter_alerts_raised_total", "counter"),
            ("polar_meter_reconcile_last_age_seconds", "gauge"),
            ("polar_meter_reconcile_last_drift", "gauge"),
            ("polar_meter_reconcile_last_drift_ratio", "gauge"),
            ("polar_meter_outbox_stats_timestamp_seconds", "gauge"),
            ("polar_meter_db_pool_connections", "gauge"),
            ("polar_meter_db_pool_waiting", "gauge"),
        ];
        let m = Metrics::default();
        m.observe("GET /healthz", 200, 0.001);
        m.polar_call("GET /v1/events/", "2xx");
        m.set_outbox(OutboxStats {
            last_reconcile: Some(LastReconcile {
                run_id: 1,
                finished_at: String::new(),
                window_end: String::new(),
                age_seconds: 1.0,
                drift: None,
                drift_ratio: None,
                mode: "full".into(),
            }),
            ..Default::default()
        });
        let pools = [PoolUsage {
            name: "requests",
            max: 1,
            size: 0,
            available: 0,
            waiting: 0,
        }];
        let text = m.render(&Now {
            pools: &pools,
            ..Default::default()
        });
        let exported: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .collect();
        assert_eq!(exported, GOLDEN);
        // Before the database's figures are first read, its families are absent.
        let fresh = Metrics::default().render(&Now::default());
        assert!(!fresh.contains("polar_meter_outbox_events"));
        assert!(fresh.contains("# TYPE polar_meter_delivery_paused gauge"));
    }
}
