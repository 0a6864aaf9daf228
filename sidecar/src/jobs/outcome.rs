//! What an ingest answer calls for, decided apart from any I/O: Polar's
//! answer and the size of the chunk in, the steps out. drain.rs performs
//! them. Positions are indexes into the chunk that was sent.
//!
//! | Polar answered                         | steps                                      |
//! |----------------------------------------|--------------------------------------------|
//! | 200, inserted + duplicates = chunk     | all sent                                   |
//! | 200, counts that do not add up         | all unconfirmed (an attempt, an alert)     |
//! | 422 naming events                      | those rejected (or too early); rest resent |
//! | 422 naming none, several events        | resent as two halves (bisection)           |
//! | 422 naming none, one event             | that event rejected                        |
//! | 429                                    | all deferred by Retry-After; budget held   |
//! | 5xx, timeout, transport, too large     | all failed (an attempt), unless Polar      |
//! |                                        | fails as a whole: then all paused          |
//! | 401/403, unreachable, not Polar        | all paused (no attempt); the probe resumes |
use std::time::Duration;

use crate::polar::client::is_future_timestamp;
use crate::polar::{Failure, Ingest};

/// A report to the database about some of the chunk's events.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// delivery_sent
    Sent(Vec<usize>),
    /// delivery_unconfirmed: a 200 whose counts do not cover the chunk.
    Unconfirmed(Vec<usize>, String),
    /// delivery_deferred: not an attempt.
    Deferred(Vec<usize>, Duration),
    /// delivery_too_early: Polar found them in its future.
    TooEarly(Vec<usize>, String),
    /// delivery_rejected
    Rejected(Vec<usize>, String),
    /// delivery_failed: an attempt. Made only when Polar is not failing as a
    /// whole (the drain asks Polar first: Polar::Transient).
    Failed(Vec<usize>, String),
}

impl Report {
    /// The chunk's events it is about.
    pub fn positions(&self) -> &[usize] {
        match self {
            Report::Sent(p)
            | Report::Unconfirmed(p, _)
            | Report::Deferred(p, _)
            | Report::TooEarly(p, _)
            | Report::Rejected(p, _)
            | Report::Failed(p, _) => p,
        }
    }
}

/// What the answer says about Polar itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Polar {
    /// Polar answered as Polar does.
    Healthy,
    /// Nothing sent now can succeed: pause delivery, hand everything back.
    Systemic(String),
    /// This call failed: is Polar failing as a whole? (a check decides)
    Transient(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Steps {
    pub polar: Polar,
    pub reports: Vec<Report>,
    /// Parts of the chunk to send again at once, in this order.
    pub resend: Vec<Vec<usize>>,
    /// Hold every sidecar's calls this long (a 429's Retry-After).
    pub hold: Option<Duration>,
}

impl Steps {
    fn healthy(reports: Vec<Report>, resend: Vec<Vec<usize>>) -> Self {
        Steps {
            polar: Polar::Healthy,
            reports,
            resend,
            hold: None,
        }
    }
}

/// The steps for Polar's `answer` to a chunk of `n` events.
pub fn decide(answer: &Ingest, n: usize) -> Steps {
    let all = || (0..n).collect::<Vec<_>>();
    match answer {
        Ingest::Accepted {
            inserted,
            duplicates,
        } => {
            // Checked: Polar's figures are untrusted input, and a wrapped
            // sum could equal the chunk's size.
            if inserted.checked_add(*duplicates) == Some(n as u64) {
                Steps::healthy(vec![Report::Sent(all())], vec![])
            } else {
                let detail =
                    format!("inserted {inserted} + duplicates {duplicates} for {n} events");
                Steps::healthy(vec![Report::Unconfirmed(all(), detail)], vec![])
            }
        }
        Ingest::RateLimited(wait) => Steps {
            polar: Polar::Healthy,
            reports: vec![Report::Deferred(all(), (*wait).max(Duration::from_secs(1)))],
            resend: vec![],
            hold: Some(*wait),
        },
        Ingest::Invalid { refused, message } => {
            let mut named: Vec<(usize, &str)> = refused
                .iter()
                .filter(|(i, _)| *i < n)
                .map(|(i, m)| (*i, m.as_str()))
                .collect();
            if named.is_empty() {
                if n > 1 {
                    // Polar named no event: halve until the bad ones stand alone.
                    return Steps::healthy(
                        vec![],
                        vec![(0..n / 2).collect(), (n / 2..n).collect()],
                    );
                }
                named = (0..n).map(|i| (i, message.as_str())).collect();
            }
            let early: Vec<usize> = named
                .iter()
                .filter(|(_, m)| is_future_timestamp(m))
                .map(|(i, _)| *i)
                .collect();
            let bad: Vec<usize> = named
                .iter()
                .filter(|(_, m)| !is_future_timestamp(m))
                .map(|(i, _)| *i)
                .collect();
            let mut reports = Vec::new();
            if !early.is_empty() {
                reports.push(Report::TooEarly(early, message.clone()));
            }
            if !bad.is_empty() {
                reports.push(Report::Rejected(bad, message.clone()));
            }
            let rest: Vec<usize> = (0..n)
                .filter(|i| !named.iter().any(|(j, _)| j == i))
                .collect();
            let resend = if rest.is_empty() { vec![] } else { vec![rest] };
            Steps::healthy(reports, resend)
        }
        Ingest::Failed(Failure::Systemic(cause)) => Steps {
            polar: Polar::Systemic(cause.clone()),
            reports: vec![],
            resend: vec![],
            hold: None,
        },
        Ingest::Failed(Failure::Transient(cause) | Failure::TooLarge(cause)) => Steps {
            polar: Polar::Transient(cause.clone()),
            reports: vec![Report::Failed(all(), cause.clone())],
            resend: vec![],
            hold: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::polar::client::{classify, ingest_answer};
    use serde_json::json;

    /// Polar's answer as the client reads it off the wire.
    fn answer(status: u16, body: serde_json::Value) -> Ingest {
        let retry = (status == 429).then(|| Duration::from_secs(7));
        ingest_answer(classify(
            "POST /v1/events/ingest",
            status,
            &serde_json::to_vec(&body).unwrap(),
            retry,
        ))
    }

    fn refused(i: usize, msg: &str) -> serde_json::Value {
        json!({"loc": ["body", "events", i, "EventCreateExternalCustomer", "name"], "msg": msg})
    }

    #[test]
    fn a_200_whose_counts_cover_the_chunk_sends_all() {
        let s = decide(&answer(200, json!({"inserted": 3, "duplicates": 1})), 4);
        assert_eq!(
            s,
            Steps::healthy(vec![Report::Sent(vec![0, 1, 2, 3])], vec![])
        );
        // duplicates may be absent: Polar's schema makes it optional
        let s = decide(&answer(200, json!({"inserted": 2})), 2);
        assert_eq!(s.reports, vec![Report::Sent(vec![0, 1])]);
    }

    #[test]
    fn a_200_whose_counts_do_not_add_up_is_unconfirmed_and_never_sent() {
        for body in [
            json!({"inserted": 1, "duplicates": 1}),
            json!({"inserted": 5, "duplicates": 0}),
            json!({"inserted": u64::MAX, "duplicates": 4}),
        ] {
            let s = decide(&answer(200, body.clone()), 3);
            assert_eq!(s.polar, Polar::Healthy, "{body}");
            assert!(
                matches!(&s.reports[..], [Report::Unconfirmed(p, d)] if *p == vec![0, 1, 2] && d.contains("for 3 events")),
                "{body}: {s:?}"
            );
            assert!(s.resend.is_empty());
        }
        // A 200 without counts is not Polar: systemic, nothing reported.
        let s = decide(&answer(200, json!({"ok": true})), 2);
        assert!(
            matches!(s.polar, Polar::Systemic(_)) && s.reports.is_empty(),
            "{s:?}"
        );
    }

    #[test]
    fn a_422_naming_events_rejects_them_and_resends_the_rest() {
        let body = json!({"detail": [refused(1, "Customer not found."), refused(3, "bad name"), refused(9, "out of range")]});
        let s = decide(&answer(422, body), 5);
        assert_eq!(s.polar, Polar::Healthy);
        assert!(
            matches!(&s.reports[..], [Report::Rejected(p, m)] if *p == vec![1, 3] && m.starts_with("HTTP 422")),
            "{s:?}"
        );
        assert_eq!(s.resend, vec![vec![0, 2, 4]]);
    }

    #[test]
    fn a_422_for_a_future_timestamp_is_too_early_not_rejected() {
        let body = json!({"detail": [refused(0, "Value error, Timestamp must be in the past."), refused(2, "bad")]});
        let s = decide(&answer(422, body), 3);
        assert!(
            matches!(&s.reports[..], [Report::TooEarly(e, _), Report::Rejected(r, _)] if *e == vec![0] && *r == vec![2]),
            "{s:?}"
        );
        assert_eq!(s.resend, vec![vec![1]]);
        // every event named: nothing left to resend
        let body = json!({"detail": [refused(0, "x")]});
        assert!(decide(&answer(422, body), 1).resend.is_empty());
    }

    #[test]
    fn a_422_naming_no_event_bisects_until_one_stands_alone() {
        let s = decide(&answer(422, json!({"detail": "invalid"})), 5);
        assert!(s.reports.is_empty());
        assert_eq!(s.resend, vec![vec![0, 1], vec![2, 3, 4]]);
        let s = decide(&answer(422, json!({"detail": "invalid"})), 1);
        assert!(
            matches!(&s.reports[..], [Report::Rejected(p, _)] if *p == vec![0]),
            "{s:?}"
        );
        assert!(s.resend.is_empty());
    }

    #[test]
    fn a_429_defers_everything_without_an_attempt_and_holds_the_budget() {
        let s = decide(&answer(429, json!({})), 3);
        assert_eq!(s.polar, Polar::Healthy);
        assert_eq!(
            s.reports,
            vec![Report::Deferred(vec![0, 1, 2], Duration::from_secs(7))]
        );
        assert_eq!(s.hold, Some(Duration::from_secs(7)));
        // Retry-After 0 still waits a second
        let s = decide(&Ingest::RateLimited(Duration::ZERO), 1);
        assert_eq!(
            s.reports,
            vec![Report::Deferred(vec![0], Duration::from_secs(1))]
        );
    }

    #[test]
    fn a_5xx_or_a_timeout_fails_the_chunk_once_polar_is_not_down_as_a_whole() {
        for a in [
            answer(500, json!({"error": "boom"})),
            answer(503, json!({})),
            Ingest::Failed(Failure::Transient("timeout".into())),
            Ingest::Failed(Failure::Transient("transport: connection reset".into())),
            Ingest::Failed(Failure::TooLarge(
                "Polar's answer exceeds 8388608 bytes".into(),
            )),
        ] {
            let s = decide(&a, 2);
            assert!(matches!(s.polar, Polar::Transient(_)), "{a:?}");
            assert!(
                matches!(&s.reports[..], [Report::Failed(p, _)] if *p == vec![0, 1]),
                "{a:?}"
            );
            assert!(s.resend.is_empty() && s.hold.is_none());
        }
    }

    #[test]
    fn a_refused_token_or_an_unreachable_polar_pauses_and_spends_nothing() {
        for a in [
            answer(401, json!({"detail": "bad token"})),
            answer(403, json!({"detail": "forbidden"})),
            answer(404, json!({})),
            answer(302, json!({})),
            Ingest::Failed(Failure::Systemic(
                "Polar unreachable: connection failed".into(),
            )),
        ] {
            let s = decide(&a, 4);
            assert!(matches!(s.polar, Polar::Systemic(_)), "{a:?}");
            assert!(s.reports.is_empty() && s.resend.is_empty(), "{a:?}");
        }
        assert!(
            matches!(decide(&answer(401, json!({})), 1).polar, Polar::Systemic(ref c) if c.contains("refused the token"))
        );
    }
}
