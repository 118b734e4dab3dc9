//! The outer step: a round's deltas become the block's next version.
//!
//! DiLoCo treats `-mean(delta)` as a gradient and applies SGD with Nesterov momentum:
//! `m <- mu*m + g; w <- w - lr*(g + mu*m)` with `g = -mean(delta)`. Plain averaging is
//! `w <- w + mean(delta)` (lr 1, no momentum). Deltas are weighted by their steps, so a
//! worker that trained longer counts for more.
use blocktrain_protocol::codec::{Array, Arrays};

use crate::config::{Outer, OuterKind};

/// Step-weighted mean of `deltas` (all with the same names and shapes).
pub fn weighted_mean(deltas: &[(Arrays, i64)]) -> Arrays {
    let total: f64 = deltas.iter().map(|(_, s)| (*s).max(1) as f64).sum();
    let mut out = Arrays::new();
    for (delta, steps) in deltas {
        let w = ((*steps).max(1) as f64 / total) as f32;
        for (name, a) in delta {
            let acc = out.entry(name.clone()).or_insert_with(|| Array {
                shape: a.shape.clone(),
                data: vec![0.0; a.data.len()],
            });
            acc.data
                .iter_mut()
                .zip(&a.data)
                .for_each(|(o, d)| *o += w * d);
        }
    }
    out
}

/// Applies the outer step to `weights` in place; `momentum` is the block's buffer (empty
/// before the first round). Returns the new momentum (empty for plain averaging).
pub fn outer_step(
    weights: &mut Arrays,
    mean_delta: &Arrays,
    momentum: Arrays,
    cfg: &Outer,
) -> Arrays {
    match cfg.optimizer {
        OuterKind::Average => {
            for (name, w) in weights.iter_mut() {
                w.data
                    .iter_mut()
                    .zip(&mean_delta[name].data)
                    .for_each(|(w, d)| *w += d);
            }
            Arrays::new()
        }
        OuterKind::Nesterov => {
            let (lr, mu) = (cfg.lr as f32, cfg.momentum as f32);
            let mut m = momentum;
            for (name, w) in weights.iter_mut() {
                let d = &mean_delta[name].data;
                let buf = m.entry(name.clone()).or_insert_with(|| Array {
                    shape: w.shape.clone(),
                    data: vec![0.0; d.len()],
                });
                for ((w, b), d) in w.data.iter_mut().zip(buf.data.iter_mut()).zip(d) {
                    let g = -d;
                    *b = mu * *b + g;
                    *w -= lr * (g + mu * *b);
                }
            }
            m
        }
    }
}

/// Root mean square of one array's values.
pub fn rms(a: &Array) -> f64 {
    let sum: f64 = a.data.iter().map(|&v| (v as f64) * (v as f64)).sum();
    (sum / a.data.len().max(1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(v: &[f32]) -> Arrays {
        Arrays::from([(
            "w".to_string(),
            Array {
                shape: vec![v.len()],
                data: v.to_vec(),
            },
        )])
    }

    #[test]
    fn mean_weights_by_steps() {
        let m = weighted_mean(&[(one(&[1.0, 0.0]), 1), (one(&[4.0, 3.0]), 2)]);
        assert_eq!(m["w"].data, vec![3.0, 2.0]);
    }

    #[test]
    fn averaging_adds_the_mean_delta() {
        let mut w = one(&[1.0, 1.0]);
        let cfg = Outer {
            optimizer: OuterKind::Average,
            ..Default::default()
        };
        let m = outer_step(&mut w, &one(&[0.5, -1.0]), Arrays::new(), &cfg);
        assert_eq!(w["w"].data, vec![1.5, 0.0]);
        assert!(m.is_empty());
    }

    #[test]
    fn nesterov_matches_the_hand_computed_steps() {
        let cfg = Outer {
            optimizer: OuterKind::Nesterov,
            lr: 0.7,
            momentum: 0.9,
        };
        let mut w = one(&[0.0]);
        // Round 1: g = -1, m = -1, step = -0.7*(-1 + 0.9*-1) = +1.33.
        let m = outer_step(&mut w, &one(&[1.0]), Arrays::new(), &cfg);
        assert!((w["w"].data[0] - 1.33).abs() < 1e-6);
        assert!((m["w"].data[0] + 1.0).abs() < 1e-6);
        // Round 2, same delta: m = -1.9, step = -0.7*(-1 - 1.71) = +1.897.
        let m = outer_step(&mut w, &one(&[1.0]), m, &cfg);
        assert!((w["w"].data[0] - (1.33 + 1.897)).abs() < 1e-5);
        assert!((m["w"].data[0] + 1.9).abs() < 1e-6);
    }
}
