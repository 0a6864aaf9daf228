//! Whether Polar can be used now. A systemic failure (token refused,
//! unreachable, not Polar) pauses delivery and provisioning at once. A
//! transient one (a 5xx, a timeout) counts against the call's own events,
//! unless every recent call failed: then the breaker is suspicious, and one
//! cheap call unrelated to any organization decides (Jobs::polar_wide): if it
//! fails too, Polar is failing as a whole and the pause begins; if it
//! answers, the failure was the call's own. While paused, the probe
//! (jobs::probe) checks Polar and resumes on success.
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The breaker opens when this many calls in a row failed...
pub const BREAKER_CALLS: usize = 3;
/// ...within this long.
pub const BREAKER_WINDOW: Duration = Duration::from_secs(600);

#[derive(Default)]
struct State {
    paused: Option<(String, Instant)>,
    /// Recent calls, newest last: when, and whether Polar answered sanely.
    recent: VecDeque<(Instant, bool)>,
}

#[derive(Default)]
pub struct Health {
    state: Mutex<State>,
}

impl Health {
    /// The cause and start of the pause, if paused.
    pub fn paused(&self) -> Option<(String, Instant)> {
        self.state.lock().unwrap().paused.clone()
    }

    pub fn is_paused(&self) -> bool {
        self.state.lock().unwrap().paused.is_some()
    }

    fn record(s: &mut State, ok: bool) {
        s.recent.push_back((Instant::now(), ok));
        while s.recent.len() > BREAKER_CALLS {
            s.recent.pop_front();
        }
    }

    /// Polar answered (any answer about the request itself: 2xx, 422, 429).
    /// Returns true when this ends a pause.
    pub fn success(&self) -> bool {
        let mut s = self.state.lock().unwrap();
        Self::record(&mut s, true);
        s.paused.take().is_some()
    }

    /// Nothing sent now can succeed. Returns true when this starts a pause.
    pub fn systemic(&self, cause: &str) -> bool {
        let mut s = self.state.lock().unwrap();
        Self::record(&mut s, false);
        if s.paused.is_none() {
            s.paused = Some((cause.to_string(), Instant::now()));
            true
        } else {
            false
        }
    }

    /// This call failed. Returns true when every recent call failed (or
    /// Polar is paused): the caller must find out whether Polar as a whole is
    /// failing before counting this against the call's events.
    pub fn transient(&self) -> bool {
        let mut s = self.state.lock().unwrap();
        Self::record(&mut s, false);
        if s.paused.is_some() {
            return true;
        }
        let now = Instant::now();
        s.recent.len() >= BREAKER_CALLS
            && s.recent
                .iter()
                .all(|(t, ok)| !ok && now.duration_since(*t) <= BREAKER_WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemic_failures_pause_at_once_and_success_resumes() {
        let h = Health::default();
        assert!(!h.is_paused());
        assert!(h.systemic("token refused"));
        assert!(!h.systemic("token refused"), "one pause, not two");
        assert_eq!(h.paused().unwrap().0, "token refused");
        assert!(h.success());
        assert!(!h.is_paused());
        assert!(!h.success());
    }

    #[test]
    fn the_breaker_grows_suspicious_when_every_recent_call_failed() {
        let h = Health::default();
        assert!(!h.transient());
        assert!(!h.transient());
        assert!(h.transient(), "the third failure in a row is suspicious");
        assert!(!h.is_paused(), "suspicion is not a pause: a check decides");
        h.success();
        assert!(!h.transient(), "one success resets the run");
        assert!(!h.transient());
        assert!(h.transient());
        h.systemic("every call fails");
        assert!(h.transient(), "while paused, every failure is Polar's");
    }
}
