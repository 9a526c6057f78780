//! Per-key exponential backoff: `base * 2^(failures-1)`, capped.

use std::time::Duration;

/// Exponential backoff parameters. The default (5 ms doubling to 1000 s) is client-go's
/// `DefaultItemBasedRateLimiter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// Longest delay ever returned.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(5),
            cap: Duration::from_secs(1000),
        }
    }
}

impl Backoff {
    /// A backoff from `base` doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap }
    }

    /// The delay before the next attempt after `failures` consecutive failures (`failures >= 1`);
    /// zero failures means no delay.
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let exp = failures - 1;
        // 2^63 nanoseconds is ~292 years: anything beyond that is past every sane cap.
        if exp >= 63 {
            return self.cap;
        }
        let factor = 1u128 << exp;
        let nanos = self.base.as_nanos().saturating_mul(factor);
        if nanos >= self.cap.as_nanos() {
            self.cap
        } else {
            Duration::from_nanos(nanos as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_from_base_and_stops_at_cap() {
        let b = Backoff::default();
        assert_eq!(b.delay(0), Duration::ZERO);
        assert_eq!(b.delay(1), Duration::from_millis(5));
        assert_eq!(b.delay(2), Duration::from_millis(10));
        assert_eq!(b.delay(3), Duration::from_millis(20));
        assert_eq!(b.delay(4), Duration::from_millis(40));
        assert_eq!(b.delay(18), Duration::from_millis(655_360));
        assert_eq!(b.delay(19), Duration::from_secs(1000));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1000));
    }
}
