//! How a worker takes part, for measuring participation (`bench network --miss
//! --slow-host`): it may miss a share of rounds and may run slower than its hardware.
//! Both are real: a missing worker asks for nothing and trains nothing while it is away,
//! and a slow one sleeps between steps, so the coordinator sees what it would see from a
//! flaky or a slower host.
use std::cell::Cell;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// A worker's participation (the default takes part in every round at full speed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Participation {
    /// Share of rounds missed, in [0, 1): after each lease it delivers (and any back-off
    /// that earned), before asking for work again, the worker stays away for as long as
    /// that lease took, with this probability.
    pub miss: f64,
    /// Runs at 1/slowdown of its speed (>= 1): after each local step, the last one of a
    /// lease included, it sleeps (slowdown - 1) times that step's duration.
    pub slowdown: f64,
    /// Seeds the missed-round draws (None: the worker's key). A benchmark gives each
    /// worker slot the same seed in every run it compares, so that slot misses the
    /// same leases (its n-th lease, counted from its start) in each of them.
    pub seed: Option<u64>,
}

impl Default for Participation {
    fn default() -> Self {
        Participation {
            miss: 0.0,
            slowdown: 1.0,
            seed: None,
        }
    }
}

impl Participation {
    /// Checks the ranges.
    pub fn validate(&self) -> crate::Result<()> {
        if !(0.0..1.0).contains(&self.miss) || !(1.0..=100.0).contains(&self.slowdown) {
            return Err(crate::NodeError::Config(format!(
                "participation: miss must be in [0, 1) and slowdown in [1, 100] (got {} and {})",
                self.miss, self.slowdown
            )));
        }
        Ok(())
    }
}

/// Draws the missed rounds, one draw per lease delivered (seeded by [`Participation::seed`],
/// else the worker's key), and paces the steps.
pub(super) struct Pacer {
    p: Participation,
    rng: rand::rngs::StdRng,
    last_step: Cell<Option<Instant>>,
}

impl Pacer {
    pub(super) fn new(p: Participation, key: &str) -> Self {
        let seed = match p.seed {
            Some(s) => blake3::derive_key("blocktrain participation seed", &s.to_le_bytes()),
            None => blake3::derive_key("blocktrain participation", key.as_bytes()),
        };
        Pacer {
            p,
            rng: rand::rngs::StdRng::from_seed(seed),
            last_step: Cell::new(None),
        }
    }

    /// How long to stay away before the next request for work, if this round is missed
    /// (`last_lease`: how long the lease just delivered took; None before the first lease
    /// and on every request after a wait). One draw per lease delivered, after any
    /// back-off its refusal earned, and none otherwise: the n-th draw decides the round
    /// after the n-th lease, however many waits a run's timing put between them, so runs
    /// with one seed stay paired.
    pub(super) fn away(&mut self, last_lease: Option<Duration>) -> Option<Duration> {
        let took = last_lease?;
        if self.p.miss <= 0.0 {
            return None;
        }
        (self.rng.random::<f64>() < self.p.miss).then_some(took)
    }

    /// Called before every local step and once after a lease's last: sleeps so the step
    /// just finished took `slowdown` times its compute.
    pub(super) fn step_boundary(&self) {
        let now = Instant::now();
        if let Some(prev) = self.last_step.get() {
            if self.p.slowdown > 1.0 {
                std::thread::sleep(now.duration_since(prev).mul_f64(self.p.slowdown - 1.0));
            }
        }
        self.last_step.set(Some(Instant::now()));
    }

    /// A new lease starts: its first step has no predecessor.
    pub(super) fn new_lease(&self) {
        self.last_step.set(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_about_the_share_asked_and_only_with_a_known_duration() {
        let mut p = Pacer::new(
            Participation {
                miss: 0.25,
                ..Participation::default()
            },
            "k",
        );
        let d = Some(Duration::from_millis(1));
        assert_eq!(
            p.away(None),
            None,
            "nothing to pause for before a first lease"
        );
        let missed = (0..4000).filter(|_| p.away(d).is_some()).count();
        assert!((850..1150).contains(&missed), "{missed} of 4000");
        let mut never = Pacer::new(Participation::default(), "k");
        assert!((0..100).all(|_| never.away(d).is_none()));
    }

    #[test]
    fn a_participation_seed_draws_the_same_misses_for_any_key() {
        let d = Some(Duration::from_millis(1));
        let draws = |seed: Option<u64>, key: &str| {
            let mut p = Pacer::new(
                Participation {
                    miss: 0.5,
                    seed,
                    ..Participation::default()
                },
                key,
            );
            (0..64).map(|_| p.away(d).is_some()).collect::<Vec<_>>()
        };
        assert_eq!(draws(Some(7), "key a"), draws(Some(7), "key b"));
        // Requests without a delivered lease before them (waits, back-offs) draw nothing.
        let mut p = Pacer::new(
            Participation {
                miss: 0.5,
                seed: Some(7),
                ..Participation::default()
            },
            "key c",
        );
        let with_waits: Vec<bool> = (0..64)
            .map(|i| {
                (0..i % 3).for_each(|_| assert_eq!(p.away(None), None));
                p.away(d).is_some()
            })
            .collect();
        assert_eq!(with_waits, draws(Some(7), "key a"));
        assert_ne!(draws(Some(7), "key a"), draws(Some(8), "key a"));
        assert_ne!(draws(None, "key a"), draws(None, "key b"));
    }

    #[test]
    fn slowdown_stretches_steps() {
        let p = Pacer::new(
            Participation {
                slowdown: 3.0,
                ..Participation::default()
            },
            "k",
        );
        let t0 = Instant::now();
        p.new_lease();
        for _ in 0..3 {
            p.step_boundary();
            std::thread::sleep(Duration::from_millis(20)); // the step's compute
        }
        // The lease's end paces its last step. Three steps of 20 ms compute, each
        // followed by 40 ms of pacing: 180 ms in all, against 60 ms unpaced (and 140 ms
        // if the last step went unpaced).
        p.step_boundary();
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(180), "{took:?}");
        assert!(Participation {
            miss: 1.0,
            ..Participation::default()
        }
        .validate()
        .is_err());
        assert!(Participation {
            slowdown: 0.5,
            ..Participation::default()
        }
        .validate()
        .is_err());
    }
}
