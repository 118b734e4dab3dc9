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

/// Combines `deltas` (all with the same names and shapes, each with its steps) by `rule`.
/// Median and trimmed ignore the steps: a weight per delta would let one claimant of
/// many steps outvote the rest, which is what these rules are there to stop.
pub fn merge_deltas(deltas: &[(Arrays, i64)], rule: &MergeRule) -> Arrays {
    let n = deltas.len();
    let Some((first, _)) = deltas.first() else {
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
            let sources: Vec<&[f32]> = deltas.iter().map(|(d, _)| &d[name].data[..]).collect();
            let data = (0..a.data.len())
                .map(|i| {
                    column.iter_mut().zip(&sources).for_each(|(c, s)| *c = s[i]);
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

    fn many(rows: &[Vec<f32>]) -> Vec<(Arrays, i64)> {
        rows.iter().map(|r| (one(r), 1)).collect()
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
