//! The tunables of polar_meter: name, default, type and bounds, in one table.
//! They live in the table `meter.setting`, which only `meter.set_setting()`
//! (granted to polar_meter_admin) writes, because several of them are
//! security-relevant (a wider `max_future_skew` lets a client bill the
//! future) and a GUC can be `SET` by any session. `meter._setting(name)` reads a
//! row or falls back to the default declared here, the only place defaults live.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A PostgreSQL interval, e.g. `30 seconds`.
    Interval,
    /// A fraction between the bounds, e.g. `0.01`.
    Ratio,
    /// A whole number between the bounds.
    Count,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Interval => "interval",
            Kind::Ratio => "ratio",
            Kind::Count => "count",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub name: &'static str,
    pub default: &'static str,
    pub kind: Kind,
    /// Inclusive bounds, in the kind's own text form.
    pub min: &'static str,
    pub max: &'static str,
    pub about: &'static str,
}

const fn s(
    name: &'static str,
    default: &'static str,
    kind: Kind,
    min: &'static str,
    max: &'static str,
    about: &'static str,
) -> Setting {
    Setting {
        name,
        default,
        kind,
        min,
        max,
        about,
    }
}

pub const ALL: &[Setting] = &[
    s("max_future_skew", "30 seconds", Kind::Interval, "0", "1 hour",
      "How far past now an event_timestamp may lie (clock skew); Polar refuses events from its future."),
    s("backoff_base", "60 seconds", Kind::Interval, "1 millisecond", "1 day",
      "Wait after the first failed delivery; it doubles with each further failure."),
    s("backoff_cap", "6 hours", Kind::Interval, "1 millisecond", "7 days",
      "The longest wait between two delivery attempts."),
    s("reconcile_lag", "6 hours", Kind::Interval, "0", "7 days",
      "How long before now the daily reconciliation window ends (Polar's event list fills asynchronously)."),
    s("drift_alert_ratio", "0.01", Kind::Ratio, "0", "1",
      "Drift ratio of the worst customer above which a reconciliation raises a drift alert."),
    s("outbox_stale_after", "1 hour", Kind::Interval, "0", "30 days",
      "An event due for longer than this raises outbox_stale."),
    s("provision_alert_after", "1 hour", Kind::Interval, "0", "30 days",
      "An organization without a Polar customer for longer than this raises customer_provisioning_failed."),
    s("alert_repeat_after", "1 hour", Kind::Interval, "0", "7 days",
      "A standing condition alerts again after this long."),
    s("reconcile_max_tries", "5", Kind::Count, "1", "100",
      "Tries of a reconcile run before it is failed and reconcile_failing is raised."),
    s("reconcile_overdue_hour", "12", Kind::Count, "0", "23",
      "UTC hour by which the previous day's window must be reconciled, else reconcile_overdue."),
    s("reconcile_lookback", "35 days", Kind::Interval, "0", "400 days",
      "How far back the daily job re-opens windows that gained sent events after their last run."),
    s("reconcile_full_every", "7 days", Kind::Interval, "0", "400 days",
      "The daily job makes its run a full per-event run when no full run was opened within this long (0: only on request)."),
    s("alert_max_tries", "12", Kind::Count, "1", "1000",
      "Tries to forward one alert to ALERT_WEBHOOK_URL before it is given up (and logged)."),
];

pub fn lookup(name: &str) -> Option<&'static Setting> {
    ALL.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_defaults_are_plain() {
        let mut names: Vec<_> = ALL.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for s in ALL {
            assert!(s.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            if s.kind != Kind::Interval {
                let (v, lo, hi): (f64, f64, f64) = (
                    s.default.parse().unwrap(),
                    s.min.parse().unwrap(),
                    s.max.parse().unwrap(),
                );
                assert!(lo <= v && v <= hi, "{} default out of bounds", s.name);
            }
        }
        assert_eq!(lookup("max_future_skew").unwrap().default, "30 seconds");
        assert!(lookup("nope").is_none());
    }
}
