//! What the sidecar's role may ask of the database, at most. The role that
//! delivers events is a credential that can be stolen: every duration, size
//! and count it can pass is bounded here, so the worst it can do with them is
//! a bounded delay (README, "Security"). The extension enforces these
//! (meter._bound) and the sidecar keeps its own settings inside them.

/// A lease on claimed events, alerts, organizations or a reconcile run.
pub const LEASE_SECS: i64 = 600;
/// A pause of every sidecar's Polar calls (a 429's Retry-After), or a
/// deferral of events.
pub const PAUSE_SECS: i64 = 3600;
/// Items in one claim.
pub const CLAIM_SIZE: i64 = 1000;
/// Bytes of events in one delivery claim (their metadata as stored, plus
/// the fixed fields): the budget no stored event can push a claim past,
/// whatever it holds. Polar takes up to 10 MiB a request.
pub const CLAIM_BYTES: i64 = 4 << 20;
/// Bytes of an alert's or an error's detail from the sidecar.
pub const DETAIL_BYTES: i64 = 2048;
/// Alerts of one kind for one organization that the sidecar's functions
/// raise in an hour; past it they are not raised (a server warning says so).
pub const ALERTS_PER_HOUR: i64 = 10;
/// Organizations asked for at once (due_organizations).
pub const ORGANIZATIONS: i64 = 1000;
/// Reconcile window length, in seconds (31 days).
pub const WINDOW_SECS: i64 = 31 * 86_400;

/// Every bound by name, for SQL.
pub const ALL: &[(&str, i64)] = &[
    ("lease_secs", LEASE_SECS),
    ("pause_secs", PAUSE_SECS),
    ("claim_size", CLAIM_SIZE),
    ("claim_bytes", CLAIM_BYTES),
    ("detail_bytes", DETAIL_BYTES),
    ("alerts_per_hour", ALERTS_PER_HOUR),
    ("organizations", ORGANIZATIONS),
    ("window_secs", WINDOW_SECS),
];

pub fn get(name: &str) -> Option<i64> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bound_has_one_name_and_a_positive_value() {
        let mut names: Vec<_> = ALL.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        assert!(ALL.iter().all(|(_, v)| *v > 0));
        assert_eq!(get("lease_secs"), Some(600));
        assert_eq!(get("nope"), None);
        // A claim of the largest events still fits Polar's 10 MiB body.
        const { assert!(CLAIM_BYTES < 10 << 20) };
    }
}
