//! Retry spacing for deliveries to Polar.
//!
//! `delay(n) = min(cap, base * 2^(n-1)) * (0.75 + 0.5 * jitter)`, jitter in [0, 1).
//! With the defaults (base 60 s, cap 6 h) the waits before attempts 2..7 are
//! about 1, 2, 4, 8, 16 and 32 minutes: an outage of about an hour is ridden
//! out before an event is dropped (and it can still be requeued). The ±25 %
//! jitter spreads retries of a large backlog so they do not return in lockstep.

pub const DEFAULT_BASE_SECS: f64 = 60.0;
pub const DEFAULT_CAP_SECS: f64 = 6.0 * 3600.0;
/// Failed attempts after which an event is `dropped` (SQL reads it through
/// `meter._max_attempts()`).
pub const MAX_ATTEMPTS: i32 = 7;

/// Seconds to wait after the `attempts`-th failed attempt. `attempts < 1`
/// is treated as 1, and a jitter outside [0, 1] is clamped, so any input
/// gives a finite, positive delay.
pub fn delay_secs(attempts: i32, jitter: f64, base_secs: f64, cap_secs: f64) -> f64 {
    let n = attempts.clamp(1, 63) - 1;
    let base = if base_secs.is_finite() && base_secs > 0.0 {
        base_secs
    } else {
        DEFAULT_BASE_SECS
    };
    let cap = if cap_secs.is_finite() && cap_secs >= base {
        cap_secs
    } else {
        base.max(DEFAULT_CAP_SECS)
    };
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.5
    };
    (base * 2f64.powi(n)).min(cap) * (0.75 + 0.5 * jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: i32, j: f64) -> f64 {
        delay_secs(n, j, DEFAULT_BASE_SECS, DEFAULT_CAP_SECS)
    }

    #[test]
    fn doubles_until_the_cap() {
        assert_eq!(d(1, 0.5), 60.0);
        assert_eq!(d(2, 0.5), 120.0);
        assert_eq!(d(6, 0.5), 1920.0);
        assert_eq!(d(9, 0.5), 15360.0);
        assert_eq!(d(10, 0.5), DEFAULT_CAP_SECS);
        assert_eq!(d(1000, 0.5), DEFAULT_CAP_SECS);
    }

    #[test]
    fn jitter_is_plus_minus_a_quarter() {
        assert_eq!(d(3, 0.0), 180.0);
        assert_eq!(d(3, 1.0), 300.0);
        assert_eq!(d(3, 7.0), 300.0);
        assert_eq!(d(3, f64::NAN), 240.0);
    }

    #[test]
    fn odd_inputs_stay_finite_and_positive() {
        for n in [i32::MIN, -1, 0, 1, 64, i32::MAX] {
            let v = delay_secs(n, 0.3, 0.0, -5.0);
            assert!(v.is_finite() && v > 0.0, "{n}: {v}");
        }
        assert_eq!(d(0, 0.5), d(1, 0.5));
    }

    #[test]
    fn a_short_clock_for_tests() {
        assert!((delay_secs(1, 0.5, 0.1, 1.0) - 0.1).abs() < 1e-12);
        assert!((delay_secs(7, 0.5, 0.1, 1.0) - 1.0).abs() < 1e-12);
    }
}
