//! How long a worker waits after the coordinator refuses one of its updates.
//!
//! A refusal is not proof of a bad worker: the held-out screen has false positives, and
//! a coordinator may refuse for reasons of its own (a bound set too tight, a restart).
//! So an honest worker waits and asks for work again rather than exiting. The wait
//! doubles with each refusal in a row, up to a cap, so a worker that is refused for a
//! lasting reason costs the coordinator little; it is jittered so that workers refused
//! together do not all come back at once.
use std::time::Duration;

use rand::Rng;

/// Refusals in a row after which every further one is logged as a warning: a worker
/// refused this often is more likely broken (data, device, build) than unlucky.
pub const WARN_AFTER: u32 = 10;

/// The waits after refused updates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// The longest wait after the first refusal.
    pub first: Duration,
    /// The longest wait at all.
    pub cap: Duration,
}

impl Default for Backoff {
    /// 2 s after the first refusal, doubling to at most 5 minutes: long enough that a
    /// worker refused for good asks about 12 times an hour, short enough that one
    /// refused by chance loses little training time.
    fn default() -> Self {
        Backoff {
            first: Duration::from_secs(2),
            cap: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The longest wait after the `n`th refusal in a row (n >= 1): `first * 2^(n-1)`,
    /// at most `cap`.
    pub fn ceiling(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(31);
        self.first
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The wait after the `n`th refusal in a row: uniform between half the ceiling and
    /// the ceiling (half is kept so the wait still grows with `n`).
    pub fn wait(&self, n: u32, rng: &mut impl Rng) -> Duration {
        let top = self.ceiling(n);
        top.mul_f64(rng.random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_with_jitter_below_each_ceiling() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(1), Duration::from_secs(2));
        assert_eq!(b.ceiling(2), Duration::from_secs(4));
        assert_eq!(b.ceiling(8), Duration::from_secs(256));
        assert_eq!(b.ceiling(9), Duration::from_secs(300));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(300));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let waits: Vec<Duration> = (0..200).map(|_| b.wait(3, &mut rng)).collect();
        assert!(waits
            .iter()
            .all(|w| (Duration::from_secs(4)..=Duration::from_secs(8)).contains(w)));
        // Jittered: not all the same.
        assert!(waits.iter().any(|w| *w != waits[0]));
    }
}
