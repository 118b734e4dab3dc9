//! A block's AdamW moments as part of its state (`[training] optimizer_state = "carry"`).
//!
//! The coordinator keeps them, so a lease stays a function of public inputs and a spot
//! check can still recompute it exactly:
//! - the copy of a version workers download holds the weights and, under the names
//!   `adam.m/NAME` and `adam.rms/NAME`, the moments its lease starts from (none at
//!   version 0: zero moments), all in the run's checkpoint codec;
//! - an update holds the weight delta and the moments' delta (end - start), in the
//!   update codec with the worker's error feedback, like any other tensor;
//! - a merge averages both the same way and adds the moments' mean delta to the served
//!   start moments, clamping second moments at zero.
//!
//! Deltas rather than end values, so that the codec's error feedback means the same
//! thing for every tensor it carries, and so that averaging K replicas from one start
//! averages what travels of their end moments: m exactly, and v's roots, so the merged
//! v is (mean of the roots)^2, at most the mean of the v (equal when the replicas agree).
//!
//! The second moment travels as its square root (`adam.rms`), not as itself: v spans
//! the square of the gradients' range, and fp16 flushes values below 6e-8 to zero (int8's
//! per-chunk scale far more), after which Adam divides a carried first moment by a
//! near-zero root. Measured (`bench optimizer-state`): v itself through int8 diverged
//! within four leases.
use blocktrain_protocol::codec::{Array, Arrays, Shapes};

/// Prefixes of moment tensors on the wire (first moment, root of the second).
pub const PREFIXES: [&str; 2] = ["adam.m/", "adam.rms/"];

/// The trainer's names for the same tensors ([`blocktrain_model::trainer::Trainer::moments`]).
const TRAINER: [&str; 2] = ["exp_avg/", "exp_avg_sq/"];

/// The trainer's moments (`exp_avg/NAME`, `exp_avg_sq/NAME`) as they travel.
pub fn to_wire(trainer: Arrays) -> Arrays {
    trainer
        .into_iter()
        .filter_map(|(name, mut a)| {
            if let Some(n) = name.strip_prefix(TRAINER[0]) {
                return Some((format!("{}{n}", PREFIXES[0]), a));
            }
            let n = name.strip_prefix(TRAINER[1])?;
            a.data.iter_mut().for_each(|v| *v = v.max(0.0).sqrt());
            Some((format!("{}{n}", PREFIXES[1]), a))
        })
        .collect()
}

/// Moments as they travel, in the trainer's names and values (roots squared, negative
/// roots taken as zero).
pub fn to_trainer(wire: &Arrays) -> Arrays {
    wire.iter()
        .filter_map(|(name, a)| {
            if let Some(n) = name.strip_prefix(PREFIXES[0]) {
                return Some((format!("{}{n}", TRAINER[0]), a.clone()));
            }
            let n = name.strip_prefix(PREFIXES[1])?;
            let data = a.data.iter().map(|&r| r.max(0.0) * r.max(0.0)).collect();
            let shape = a.shape.clone();
            Some((format!("{}{n}", TRAINER[1]), Array { shape, data }))
        })
        .collect()
}

/// Whether `name` names a moment tensor.
pub fn is_moment(name: &str) -> bool {
    PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Whether `name` names a second moment's root (kept non-negative).
pub fn is_second_moment(name: &str) -> bool {
    name.starts_with(PREFIXES[1])
}

/// `state` split into (weights, moments).
pub fn split(state: Arrays) -> (Arrays, Arrays) {
    state.into_iter().partition(|(name, _)| !is_moment(name))
}

/// `a` and `b` in one set of arrays (their names are disjoint).
pub fn join(mut a: Arrays, b: Arrays) -> Arrays {
    a.extend(b);
    a
}

/// The names and shapes of the moments of weights shaped `weights`.
pub fn shapes_of(weights: &Shapes) -> Shapes {
    weights
        .iter()
        .flat_map(|(name, shape)| PREFIXES.map(|p| (format!("{p}{name}"), shape.clone())))
        .collect()
}

/// Zero moments for weights shaped `weights`.
pub fn zeros(weights: &Shapes) -> Arrays {
    shapes_of(weights)
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            (
                name,
                Array {
                    shape,
                    data: vec![0.0; n],
                },
            )
        })
        .collect()
}

/// `start + delta` for every moment `delta` names (a missing start is zero), roots of
/// second moments clamped at zero: the moments a merge serves next.
pub fn apply(start: &Arrays, delta: &Arrays) -> Arrays {
    delta
        .iter()
        .filter(|(name, _)| is_moment(name))
        .map(|(name, d)| {
            let base = start.get(name).filter(|s| s.data.len() == d.data.len());
            let mut data: Vec<f32> = match base {
                Some(s) => s.data.iter().zip(&d.data).map(|(s, d)| s + d).collect(),
                None => d.data.clone(),
            };
            if is_second_moment(name) {
                data.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            (
                name.clone(),
                Array {
                    shape: d.shape.clone(),
                    data,
                },
            )
        })
        .collect()
}

/// The bound honest Adam keeps between a coordinate's first moment and its second
/// moment's root, |m| <= kappa x rms (Cauchy-Schwarz over the two moving averages of the
/// same gradients), or None when beta1^2 >= beta2 (no such bound).
pub fn kappa(beta1: f64, beta2: f64) -> Option<f64> {
    let ratio = beta1 * beta1 / beta2;
    (ratio < 1.0 && beta2 < 1.0)
        .then(|| ((1.0 - beta1).powi(2) / ((1.0 - beta2) * (1.0 - ratio))).sqrt())
}

fn l2<'a>(arrays: impl Iterator<Item = &'a Array>) -> f64 {
    arrays
        .flat_map(|a| &a.data)
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// The L2 norms of an update's moment deltas: (first moments, roots).
pub fn delta_norms(update: &Arrays) -> (f64, f64) {
    let of = |p: &str| {
        l2(update
            .iter()
            .filter(|(n, _)| n.starts_with(p))
            .map(|(_, a)| a))
    };
    (of(PREFIXES[0]), of(PREFIXES[1]))
}

/// Projects served moments into the set honest Adam stays in, so no update (checked or
/// not) can leave the block with moments that stall or blow up its next leases. With
/// gradients clipped to a global norm `clip`: roots >= 0 with ||rms||_2 <= clip (the sum
/// of v is an average of squared gradient norms), |m| <= kappa x rms per coordinate,
/// and ||m||_2 <= clip (an average of clipped gradients). Honest moments are inside
/// already (up to codec rounding); the projection is deterministic, so a lease starting
/// from the served copy stays recomputable.
pub fn project(moments: &mut Arrays, clip: f64, kappa: Option<f64>) {
    let scale_to = |arrays: &mut Arrays, prefix: &str, limit: f64| {
        let norm = l2(arrays
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, a)| a));
        if norm > limit {
            let f = (limit / norm) as f32;
            for (_, a) in arrays.iter_mut().filter(|(n, _)| n.starts_with(prefix)) {
                a.data.iter_mut().for_each(|v| *v *= f);
            }
        }
    };
    for (_, a) in moments.iter_mut().filter(|(n, _)| is_second_moment(n)) {
        a.data.iter_mut().for_each(|v| *v = v.max(0.0));
    }
    scale_to(moments, PREFIXES[1], clip);
    if let Some(k) = kappa {
        let roots: Vec<(String, Vec<f32>)> = moments
            .iter()
            .filter_map(|(n, a)| Some((n.strip_prefix(PREFIXES[1])?.to_string(), a.data.clone())))
            .collect();
        for (name, r) in roots {
            if let Some(m) = moments.get_mut(&format!("{}{name}", PREFIXES[0])) {
                for (m, r) in m.data.iter_mut().zip(&r) {
                    let cap = k as f32 * r;
                    *m = m.clamp(-cap, cap);
                }
            }
        }
    }
    scale_to(moments, PREFIXES[0], clip);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(v: &[f32]) -> Array {
        Array {
            shape: vec![v.len()],
            data: v.to_vec(),
        }
    }

    #[test]
    fn split_join_and_shapes() {
        let w = Shapes::from([("a".to_string(), vec![2])]);
        let z = zeros(&w);
        assert_eq!(
            z.keys().cloned().collect::<Vec<_>>(),
            ["adam.m/a", "adam.rms/a"]
        );
        let state = join(Arrays::from([("a".to_string(), arr(&[1.0, 2.0]))]), z);
        let (weights, moments) = split(state);
        assert_eq!(weights.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(moments.len(), 2);
    }

    #[test]
    fn apply_adds_and_clamps_second_moments_only() {
        let start = Arrays::from([
            ("adam.m/a".to_string(), arr(&[1.0, -1.0])),
            ("adam.rms/a".to_string(), arr(&[0.5, 0.1])),
        ]);
        let delta = Arrays::from([
            ("a".to_string(), arr(&[9.0, 9.0])),
            ("adam.m/a".to_string(), arr(&[-3.0, 0.5])),
            ("adam.rms/a".to_string(), arr(&[0.25, -0.3])),
        ]);
        let out = apply(&start, &delta);
        assert_eq!(out.len(), 2, "weights are not moments");
        assert_eq!(
            out["adam.m/a"].data,
            [-2.0, -0.5],
            "first moments may go negative"
        );
        assert_eq!(out["adam.rms/a"].data, [0.75, 0.0], "roots clamp at zero");
        let fresh = apply(&Arrays::new(), &delta);
        assert_eq!(
            fresh["adam.m/a"].data,
            [-3.0, 0.5],
            "no start: zero moments"
        );
    }

    #[test]
    fn second_moments_travel_as_roots_and_come_back() {
        let trainer = Arrays::from([
            ("exp_avg/a".to_string(), arr(&[0.5, -2.0])),
            ("exp_avg_sq/a".to_string(), arr(&[4.0, 1e-10])),
        ]);
        let wire = to_wire(trainer.clone());
        assert_eq!(wire["adam.m/a"].data, [0.5, -2.0]);
        assert_eq!(wire["adam.rms/a"].data[0], 2.0);
        assert!(
            (wire["adam.rms/a"].data[1] - 1e-5).abs() < 1e-9,
            "a root fp16 keeps"
        );
        let back = to_trainer(&wire);
        assert_eq!(back["exp_avg/a"].data, trainer["exp_avg/a"].data);
        assert_eq!(back["exp_avg_sq/a"].data[0], 4.0);
        let negative = Arrays::from([("adam.rms/a".to_string(), arr(&[-1.0]))]);
        assert_eq!(to_trainer(&negative)["exp_avg_sq/a"].data, [0.0]);
    }

    #[test]
    fn projection_keeps_honest_moments_and_bounds_forged_ones() {
        let k = kappa(0.9, 0.95).unwrap();
        assert!((k - 1.165).abs() < 1e-3, "{k}");
        assert_eq!(kappa(0.9, 0.8), None);
        // Inside the set: unchanged.
        let honest = Arrays::from([
            ("adam.m/a".to_string(), arr(&[0.1, -0.05])),
            ("adam.rms/a".to_string(), arr(&[0.2, 0.1])),
        ]);
        let mut p = honest.clone();
        project(&mut p, 1.0, Some(k));
        assert_eq!(p, honest);
        // A huge first moment over a zero root (a step of lr x m / eps), huge roots,
        // negative roots: all brought back.
        let mut forged = Arrays::from([
            ("adam.m/a".to_string(), arr(&[100.0, -3.0])),
            ("adam.rms/a".to_string(), arr(&[0.0, 50.0])),
            ("adam.m/b".to_string(), arr(&[0.5])),
            ("adam.rms/b".to_string(), arr(&[-1.0])),
        ]);
        project(&mut forged, 1.0, Some(k));
        let (m, r) = (&forged["adam.m/a"].data, &forged["adam.rms/a"].data);
        assert_eq!(m[0], 0.0, "no first moment without a second");
        assert!(
            (r[1] - 1.0).abs() < 1e-6,
            "roots scaled to the clip norm: {r:?}"
        );
        assert!(m[1].abs() <= k as f32 * r[1] + 1e-6);
        assert_eq!(forged["adam.rms/b"].data, [0.0]);
        assert_eq!(forged["adam.m/b"].data, [0.0]);
        let (dm, dr) = delta_norms(&forged);
        assert!(dm <= 1.0 + 1e-6 && dr <= 1.0 + 1e-6, "{dm} {dr}");
    }
}
