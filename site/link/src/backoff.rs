//! Waits between reconnects: exponential with full jitter (a random wait between zero and the
//! current ceiling), so a thousand peers that lost their server at the same moment do not
//! come back in lockstep; the ceiling doubles per failure up to a cap, and goes back to the
//! start only after a link stayed up for [`Backoff::stable`].

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    /// A link that lasted this long resets the ceiling.
    pub stable: Duration,
    ceiling: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, cap: Duration, stable: Duration) -> Backoff {
        Backoff {
            initial,
            cap,
            stable,
            ceiling: initial,
        }
    }

    /// The wait after a link (or an attempt) that began at `started` ended.
    pub fn next(&mut self, started: Instant) -> Duration {
        if started.elapsed() >= self.stable {
            self.ceiling = self.initial;
        }
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.cap);
        let millis = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(rand::random::<u64>() % (millis + 1))
    }
}

impl Default for Backoff {
    /// 500 ms doubling to 30 s; a minute up resets it.
    fn default() -> Self {
        Backoff::new(
            Duration::from_millis(500),
            Duration::from_secs(30),
            Duration::from_secs(60),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_stay_under_a_doubling_ceiling_and_the_cap() {
        let mut b = Backoff::default();
        let now = Instant::now();
        let mut ceiling = Duration::from_millis(500);
        for _ in 0..12 {
            assert!(b.next(now) <= ceiling);
            ceiling = (ceiling * 2).min(Duration::from_secs(30));
        }
        // Capped: many draws at the cap spread over it rather than sitting at one value.
        let draws: Vec<Duration> = (0..200).map(|_| b.next(now)).collect();
        assert!(draws.iter().all(|d| *d <= Duration::from_secs(30)));
        assert!(draws.iter().any(|d| *d < Duration::from_secs(10)));
        assert!(draws.iter().any(|d| *d > Duration::from_secs(20)));
    }

    #[test]
    fn a_stable_link_resets_the_ceiling() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(30),
            Duration::from_millis(0),
        );
        for _ in 0..10 {
            assert!(b.next(Instant::now()) <= Duration::from_millis(100));
        }
    }
}
