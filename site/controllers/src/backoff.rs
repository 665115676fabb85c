//! Exponential back-off with full jitter: each wait is a random time up to the current bound,
//! and the bound doubles up to a cap. After an outage a whole site's retries spread out instead
//! of arriving in lockstep.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    bound: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            bound: base,
        }
    }

    /// The next wait (at least 10 % of the current bound, so a retry never spins), doubling the
    /// bound for the one after.
    pub fn next_wait(&mut self) -> Duration {
        use rand::Rng;
        let bound = self.bound;
        self.bound = (self.bound * 2).min(self.cap);
        bound.mul_f64(rand::rng().random_range(0.1..=1.0))
    }

    /// After a success: the next failure waits from the base again.
    pub fn reset(&mut self) {
        self.bound = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap_with_jitter_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<Duration> = (0..8).map(|_| b.next_wait()).collect();
        assert!(waits[0] <= Duration::from_millis(100) && waits[0] >= Duration::from_millis(10));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(1)));
        assert!(waits[7] >= Duration::from_millis(100), "{waits:?}");
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }
}
