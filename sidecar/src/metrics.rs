//! Prometheus text exposition, kept in-process: requests by route and status,
//! a latency histogram per route, pool usage and recorded events.
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
    pub events_recorded: AtomicU64,
    pub events_already_recorded: AtomicU64,
}

pub struct PoolUsage {
    pub max: usize,
    pub size: usize,
    pub available: usize,
    pub waiting: usize,
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

    pub fn render(&self, pool: &PoolUsage) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP polar_meter_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE polar_meter_http_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "polar_meter_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP polar_meter_http_request_duration_seconds Request latency by route.\n",
        );
        out.push_str("# TYPE polar_meter_http_request_duration_seconds histogram\n");
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
        out.push_str(
            "# HELP polar_meter_events_total Events accepted by POST /api/v1/meter, by outcome.\n",
        );
        out.push_str("# TYPE polar_meter_events_total counter\n");
        let _ = writeln!(
            out,
            "polar_meter_events_total{{status=\"recorded\"}} {}",
            self.events_recorded.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "polar_meter_events_total{{status=\"already_recorded\"}} {}",
            self.events_already_recorded.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP polar_meter_db_pool_connections Database pool connections by state.\n",
        );
        out.push_str("# TYPE polar_meter_db_pool_connections gauge\n");
        let _ = writeln!(
            out,
            "polar_meter_db_pool_connections{{state=\"max\"}} {}",
            pool.max
        );
        let _ = writeln!(
            out,
            "polar_meter_db_pool_connections{{state=\"open\"}} {}",
            pool.size
        );
        let _ = writeln!(
            out,
            "polar_meter_db_pool_connections{{state=\"idle\"}} {}",
            pool.available
        );
        let _ = writeln!(
            out,
            "polar_meter_db_pool_connections{{state=\"in_use\"}} {}",
            pool.size.saturating_sub(pool.available)
        );
        out.push_str(
            "# HELP polar_meter_db_pool_waiting Requests waiting for a database connection.\n",
        );
        out.push_str("# TYPE polar_meter_db_pool_waiting gauge\n");
        let _ = writeln!(out, "polar_meter_db_pool_waiting {}", pool.waiting);
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
        let text = m.render(&PoolUsage {
            max: 4,
            size: 2,
            available: 1,
            waiting: 0,
        });
        assert!(text.contains(
            "polar_meter_http_requests_total{route=\"POST /api/v1/meter\",status=\"202\"} 2"
        ));
        assert!(text.contains("le=\"0.001\"} 1\n"));
        assert!(text.contains("le=\"0.025\"} 2\n"));
        assert!(text.contains("le=\"5\"} 2\n"));
        assert!(text.contains("le=\"+Inf\"} 3\n"));
        assert!(text.contains("polar_meter_db_pool_connections{state=\"in_use\"} 1"));
    }
}
