//! The outer step: a round's deltas become the block's next version.
//!
//! DiLoCo treats `-mean(delta)` as a gradient and applies SGD with Nesterov momentum:
//! `m <- mu*m + g; w <- w - lr*(g + mu*m)` with `g = -mean(delta)`. Plain averaging is
//! `w <- w + mean(delta)` (lr 1, no momentum). Deltas are weighted by their steps, so a
//! worker that trained longer counts for more.
//!
//! The round's combined delta can also be a coordinate-wise median or trimmed mean
//! ([`MergeRule`]): a few wrong or hostile deltas then move a weight by at most the
//! spread of the honest ones, where they move a mean without bound.
//!
//! Stale updates (`[training] max_staleness`): an update computed from k versions
//! before the round's own is merged in the delta form, its delta added to the current
//! weights as if it were fresh but at weight s(k) = (1 + k)^-a ([`staleness_scale`]),
//! FedAsync's polynomial staleness function (Xie, Koyejo and Gupta 2019, "Asynchronous
//! Federated Optimization", arXiv:1903.03934); Zhang et al. 2016 ("Staleness-aware
//! Async-SGD") scale the learning rate by staleness in the same spirit. The mean's
//! weights are `steps_i x s(k_i) / sum(steps)`: the denominator is not renormalized, so
//! a round of fresh updates (s = 1) merges bit for bit as without staleness, and a lone
//! stale update moves the weights by s(k) of its delta. The robust rules scale each
//! delta by s(k) before their coordinate-wise combine. Every tensor of an update is
//! combined alike, so carried AdamW moments' deltas ([`crate::moments`]) get the same
//! scaled mean as the weights.
//!
//! The settings of all this, `run.toml`'s `[outer]` table ([`Outer`]), live here too;
//! `config` only assembles the file from its tables, so this module needs nothing of it.
use std::fmt;

use blocktrain_protocol::codec::{Array, Arrays};
use serde::{Deserialize, Serialize};

use crate::{NodeError, Result};

/// The outer optimizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Outer {
    /// `average` (plain mean of deltas; the default, best in docs/RESULTS.md at our
    /// scale) or `nesterov` (DiLoCo).
    pub optimizer: OuterKind,
    /// Outer learning rate (nesterov).
    pub lr: f64,
    /// Outer momentum (nesterov).
    pub momentum: f64,
    /// How a round's deltas combine before the outer step: `mean` (step-weighted; the
    /// default), `median` or `trimmed:F` (coordinate-wise, unweighted; F in [0, 0.5) is
    /// the fraction dropped from each end). The robust rules bound what a few bad
    /// updates can do, at some cost in noise with honest ones.
    pub merge: String,
}

/// Outer optimizer kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OuterKind {
    /// DiLoCo: SGD with Nesterov momentum on the averaged pseudo-gradient.
    Nesterov,
    /// New weights = old + mean delta.
    Average,
}

impl Default for Outer {
    fn default() -> Self {
        Outer {
            optimizer: OuterKind::Average,
            lr: 0.7,
            momentum: 0.9,
            merge: "mean".into(),
        }
    }
}

impl Outer {
    /// The parsed `merge` setting.
    pub fn merge_rule(&self) -> Result<MergeRule> {
        MergeRule::parse(&self.merge)
    }
}

/// How a round's deltas are combined into one (`[outer] merge`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MergeRule {
    /// Step-weighted mean (`mean`): every delta counts, in proportion to its steps.
    Mean,
    /// Coordinate-wise median (`median`), unweighted; with an even count, the mean of the
    /// two middle values.
    Median,
    /// Coordinate-wise trimmed mean (`trimmed:F`), unweighted: `floor(F x n)` values
    /// dropped from each end, F in [0, 0.5).
    Trimmed(f64),
}

impl MergeRule {
    /// Parses `mean`, `median` or `trimmed:F` with F in [0, 0.5).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            NodeError::Config(format!(
                "outer.merge is mean, median or trimmed:F with F in [0, 0.5) (the fraction \
                 dropped from each end), not '{s}'"
            ))
        };
        match s.split_once(':') {
            None if s == "mean" => Ok(MergeRule::Mean),
            None if s == "median" => Ok(MergeRule::Median),
            Some(("trimmed", f)) => f
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|f| (0.0..0.5).contains(f))
                .map(MergeRule::Trimmed)
                .ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for MergeRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MergeRule::Mean => f.write_str("mean"),
            MergeRule::Median => f.write_str("median"),
            MergeRule::Trimmed(x) => write!(f, "trimmed:{x}"),
        }
    }
}

/// FedAsync's polynomial staleness function `s(k) = (1 + k)^-a`: the weight of an update
/// computed `k` versions before the one it is merged into (1 for a fresh one, exactly).
pub fn staleness_scale(k: u64, a: f64) -> f64 {
    match k {
        0 => 1.0,
        k => (1.0 + k as f64).powf(-a),
    }
}

/// Combines `deltas` (all with the same names and shapes, each with its steps and its
/// staleness scale s(k), 1 for a fresh update) by `rule`. Median and trimmed ignore the
/// steps: a weight per delta would let one claimant of many steps outvote the rest,
/// which is what these rules are there to stop; they combine the deltas each scaled by
/// its s(k) (a no-op at s = 1).
pub fn merge_deltas(deltas: &[(Arrays, i64, f64)], rule: &MergeRule) -> Arrays {
    let n = deltas.len();
    let Some((first, _, _)) = deltas.first() else {
        return Arrays::new();
    };
    let keep = match *rule {
        MergeRule::Mean => return weighted_mean(deltas),
        // Even n keeps the two middle values; odd n the middle one.
        MergeRule::Median => n - 2 * ((n - 1) / 2),
        // F < 0.5 keeps at least one value; the min guards F slightly under 0.5 by rounding.
        MergeRule::Trimmed(f) => n - 2 * ((f * n as f64).floor() as usize).min((n - 1) / 2),
    };
    let drop = (n - keep) / 2;
    let mut column = vec![0f32; n];
    first
        .iter()
        .map(|(name, a)| {
            let sources: Vec<(&[f32], f64)> = deltas
                .iter()
                .map(|(d, _, scale)| (&d[name].data[..], *scale))
                .collect();
            let data = (0..a.data.len())
                .map(|i| {
                    // f32 -> f64, times 1, -> f32 is exact: fresh values pass unchanged.
                    column
                        .iter_mut()
                        .zip(&sources)
                        .for_each(|(c, (s, scale))| *c = (s[i] as f64 * scale) as f32);
                    column.sort_unstable_by(f32::total_cmp);
                    let kept = &column[drop..drop + keep];
                    (kept.iter().map(|&v| v as f64).sum::<f64>() / keep as f64) as f32
                })
                .collect();
            (
                name.clone(),
                Array {
                    shape: a.shape.clone(),
                    data,
                },
            )
        })
        .collect()
}

/// Step-weighted mean of `deltas` (all with the same names and shapes), each delta's
/// weight scaled by its staleness scale: `sum_i steps_i s_i d_i / sum_i steps_i`. The
/// denominator has no s_i, so stale updates pull less without the fresh ones pulling
/// more; with every s_i = 1 it is the plain step-weighted mean, to the bit.
pub fn weighted_mean(deltas: &[(Arrays, i64, f64)]) -> Arrays {
    let total: f64 = deltas.iter().map(|(_, s, _)| (*s).max(1) as f64).sum();
    let mut out = Arrays::new();
    for (delta, steps, scale) in deltas {
        // steps x 1.0 is exact, so a fresh update's weight is what it was without staleness.
        let w = ((*steps).max(1) as f64 * scale / total) as f32;
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
        let m = weighted_mean(&[(one(&[1.0, 0.0]), 1, 1.0), (one(&[4.0, 3.0]), 2, 1.0)]);
        assert_eq!(m["w"].data, vec![3.0, 2.0]);
    }

    #[test]
    fn staleness_scales_a_delta_without_renormalizing_the_round() {
        assert_eq!(staleness_scale(0, 0.5), 1.0);
        assert_eq!(staleness_scale(3, 0.5), 0.5);
        assert_eq!(staleness_scale(1, 1.0), 0.5);
        assert_eq!(staleness_scale(7, 0.0), 1.0);
        // A lone stale update moves the weights by s(k) of its delta, not all of it.
        let s = staleness_scale(3, 0.5);
        let lone = weighted_mean(&[(one(&[2.0, -4.0]), 5, s)]);
        assert_eq!(lone["w"].data, vec![1.0, -2.0]);
        // Fresh 1 step of 4.0 and a stale (s = 0.5) 3 steps of 8.0: (4 + 3 x 0.5 x 8) / 4.
        let m = weighted_mean(&[(one(&[4.0]), 1, 1.0), (one(&[8.0]), 3, 0.5)]);
        assert_eq!(m["w"].data, vec![4.0]);
        // The robust rules scale each delta before combining: median of 1, 2 x 0.5, 6.
        let rows = [
            (one(&[1.0]), 1, 1.0),
            (one(&[2.0]), 1, 0.5),
            (one(&[6.0]), 1, 1.0),
        ];
        assert_eq!(merge_deltas(&rows, &MergeRule::Median)["w"].data, vec![1.0]);
        let trimmed = merge_deltas(&rows, &MergeRule::Trimmed(0.0))["w"].data[0];
        assert!((trimmed - 8.0 / 3.0).abs() < 1e-6, "{trimmed}");
    }

    #[test]
    fn fresh_updates_merge_bit_for_bit_as_without_staleness() {
        // The mean as it was computed before stale updates (weight steps / total).
        let rows: Vec<(Arrays, i64, f64)> = (0..5)
            .map(|k| {
                let v: Vec<f32> = (0..32)
                    .map(|i| ((i * 7 + k * 3) as f32 * 0.31).sin() * 1e-3)
                    .collect();
                (one(&v), 3 + k as i64, 1.0)
            })
            .collect();
        let total: f64 = rows.iter().map(|r| r.1 as f64).sum();
        let mut want = [0f32; 32];
        for (d, steps, _) in &rows {
            let w = (*steps as f64 / total) as f32;
            want.iter_mut()
                .zip(&d["w"].data)
                .for_each(|(o, x)| *o += w * x);
        }
        let got = weighted_mean(&rows);
        assert_eq!(
            got["w"]
                .data
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    fn many(rows: &[Vec<f32>]) -> Vec<(Arrays, i64, f64)> {
        rows.iter().map(|r| (one(r), 1, 1.0)).collect()
    }

    #[test]
    fn rules_parse_and_print_back() {
        for s in ["mean", "median", "trimmed:0.2", "trimmed:0"] {
            assert_eq!(MergeRule::parse(s).unwrap().to_string(), s);
        }
        for s in [
            "trimmed:0.5",
            "trimmed:-0.1",
            "trimmed:x",
            "trimmed",
            "avg",
            "median:1",
        ] {
            let e = MergeRule::parse(s).unwrap_err().to_string();
            assert!(e.contains(s) && e.contains("trimmed:F"), "{e}");
        }
    }

    #[test]
    fn median_and_trimmed_handle_few_deltas() {
        let rows = [vec![1.0, -2.0], vec![3.0, 6.0]];
        for rule in [MergeRule::Median, MergeRule::Trimmed(0.3)] {
            assert_eq!(merge_deltas(&many(&rows[..1]), &rule)["w"].data, rows[0]);
            // Two deltas: nothing to outvote, so both rules are the plain mean.
            assert_eq!(merge_deltas(&many(&rows), &rule)["w"].data, vec![2.0, 2.0]);
        }
        let odd = many(&[vec![5.0], vec![1.0], vec![2.0]]);
        assert_eq!(merge_deltas(&odd, &MergeRule::Median)["w"].data, vec![2.0]);
        assert_eq!(
            merge_deltas(&odd, &MergeRule::Trimmed(0.0))["w"].data,
            vec![8.0 / 3.0]
        );
        assert!(merge_deltas(&[], &MergeRule::Median).is_empty());
    }

    /// Four honest deltas near `h` and one outlier: the mean follows the outlier, the
    /// robust rules stay within the honest spread.
    #[test]
    fn one_outlier_moves_the_mean_but_not_median_or_trimmed() {
        let h: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin() * 1e-3).collect();
        let honest: Vec<Vec<f32>> = (0..4)
            .map(|k| {
                h.iter()
                    .enumerate()
                    .map(|(i, v)| v * (1.0 + 0.1 * ((i * 7 + k * 13) % 5) as f32 / 4.0))
                    .collect()
            })
            .collect();
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let off = |m: &Arrays| {
            let d: Vec<f32> = m["w"].data.iter().zip(&h).map(|(a, b)| a - b).collect();
            norm(&d) / norm(&h)
        };
        let flipped: Vec<f32> = honest[0].iter().map(|v| -v).collect();
        let scaled: Vec<f32> = honest[0].iter().map(|v| 100.0 * v).collect();
        for outlier in [flipped, scaled] {
            let mut rows = honest.clone();
            rows.push(outlier);
            let d = many(&rows);
            let mean = off(&merge_deltas(&d, &MergeRule::Mean));
            let median = off(&merge_deltas(&d, &MergeRule::Median));
            let trimmed = off(&merge_deltas(&d, &MergeRule::Trimmed(0.2)));
            assert!(mean > 0.35, "mean {mean}");
            assert!(
                median < 0.1 && trimmed < 0.1,
                "median {median} trimmed {trimmed}"
            );
        }
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
            ..Default::default()
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
