//! Held-out evaluation: the ELBO per interval and in total, with its standard error,
//! and the AR reference's exact NLL. Callers pass held-out windows only.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::Schedule;
use crate::diffusion::{self, TDraw};
use crate::transformer::Denoiser;

/// One interval's share of the ELBO.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Share {
    /// t(b-1).
    pub lo: f64,
    /// t(b).
    pub hi: f64,
    /// Mean nats per byte.
    pub nats: f64,
    /// Standard error of `nats`.
    pub se: f64,
}

/// A held-out likelihood bound (diffusion) or exact NLL (AR), nats per byte.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// Windows evaluated.
    pub windows: usize,
    /// Monte-Carlo draws per window and interval (1 for the exact AR NLL).
    pub samples: usize,
    /// Per-interval shares (empty for AR).
    pub shares: Vec<Share>,
    /// Total nats per byte (ELBO bound or exact NLL).
    pub nats: f64,
    /// Standard error of `nats` over windows.
    pub se: f64,
}

impl Report {
    /// Bits per byte.
    pub fn bits(&self) -> f64 {
        self.nats / std::f64::consts::LN_2
    }
}

fn mean_se(values: &Tensor) -> (f64, f64) {
    let n = values.size()[0] as f64;
    let mean = values.mean(Kind::Double).double_value(&[]);
    let se = if n > 1.0 {
        values.std(true).double_value(&[]) / n.sqrt()
    } else {
        f64::NAN
    };
    (mean, se)
}

/// How an evaluation draws and batches.
#[derive(Clone, Copy, Debug)]
pub struct EvalSettings {
    /// Monte-Carlo (t, mask) draws per window and interval.
    pub samples: usize,
    /// Windows per forward pass.
    pub batch: i64,
    /// Seed of the masks (fixed, so models are compared on the same draws).
    pub seed: i64,
    /// Where the networks live.
    pub device: Device,
}

/// The ELBO of held-out `windows` (W, T): interval b is scored by `nets[b]` (the same
/// network may appear for every interval, as for E2E). Each window gets `samples`
/// independent (t, mask) draws per interval; masks are seeded by `seed`.
/// `progress` is called with the number of windows just scored.
pub fn diffusion_elbo(
    nets: &[&Denoiser],
    schedule: &Schedule,
    windows: &Tensor,
    settings: &EvalSettings,
    progress: &mut dyn FnMut(u64),
) -> Report {
    let EvalSettings {
        samples,
        batch,
        seed,
        device,
    } = *settings;
    assert_eq!(nets.len(), schedule.blocks(), "one network per interval");
    let w = windows.size()[0];
    let blocks = schedule.blocks() as i64;
    tch::manual_seed(seed);
    let per_window = tch::no_grad(|| {
        let acc = Tensor::zeros([w, blocks], (Kind::Double, Device::Cpu));
        for (b, net) in nets.iter().enumerate() {
            let (lo, hi) = schedule.interval(b);
            for _ in 0..samples {
                let mut start = 0;
                while start < w {
                    let n = batch.min(w - start);
                    let x = windows.narrow(0, start, n).to_device(device);
                    let est = diffusion::interval_estimate(net, &x, lo, hi, TDraw::Independent);
                    let mut slot = acc.narrow(0, start, n).select(1, b as i64);
                    let _ = slot.g_add_(
                        &(est.to_device(Device::Cpu).to_kind(Kind::Double) / samples as f64),
                    );
                    progress(n as u64);
                    start += n;
                }
            }
        }
        acc
    });
    let shares = (0..blocks)
        .map(|b| {
            let (lo, hi) = schedule.interval(b as usize);
            let (nats, se) = mean_se(&per_window.select(1, b));
            Share { lo, hi, nats, se }
        })
        .collect();
    let (nats, se) = mean_se(&per_window.sum_dim_intlist(1, false, Kind::Double));
    Report {
        windows: w as usize,
        samples,
        shares,
        nats,
        se,
    }
}

/// Exact autoregressive NLL of held-out `windows`, nats per byte.
pub fn ar_nll(
    net: &Denoiser,
    windows: &Tensor,
    batch: i64,
    device: Device,
    progress: &mut dyn FnMut(u64),
) -> Report {
    let w = windows.size()[0];
    let per_window = tch::no_grad(|| {
        let mut parts = Vec::new();
        let mut start = 0;
        while start < w {
            let n = batch.min(w - start);
            let x = windows.narrow(0, start, n).to_device(device);
            parts.push(
                diffusion::ar_nll(net, &x)
                    .to_device(Device::Cpu)
                    .to_kind(Kind::Double),
            );
            progress(n as u64);
            start += n;
        }
        Tensor::cat(&parts, 0)
    });
    let (nats, se) = mean_se(&per_window);
    Report {
        windows: w as usize,
        samples: 1,
        shares: Vec::new(),
        nats,
        se,
    }
}

/// Masked cross-entropy `g(t)` (nats per masked byte) at the midpoints of `grid` equal
/// cells of [0, 1]; `net_at(t)` picks the network that owns level t. The ELBO is
/// `∫ g(t) dt`, so this curve tells where along t the loss lives.
pub fn ce_curve<'a>(
    net_at: &dyn Fn(f64) -> &'a Denoiser,
    windows: &Tensor,
    grid: usize,
    batch: i64,
    seed: i64,
    device: Device,
) -> Vec<(f64, f64)> {
    tch::manual_seed(seed);
    let w = windows.size()[0];
    tch::no_grad(|| {
        (0..grid)
            .map(|k| {
                let t = (k as f64 + 0.5) / grid as f64;
                let mut sum = 0.0;
                let mut start = 0;
                while start < w {
                    let n = batch.min(w - start);
                    let x = windows.narrow(0, start, n).to_device(device);
                    let noise = diffusion::MaskNoise::draw(n, x.size()[1], device);
                    let ts = Tensor::full([n], t, (Kind::Float, device));
                    sum += diffusion::estimate_with(net_at(t), &x, &ts, &noise, 1.0)
                        .sum(Kind::Double)
                        .double_value(&[]);
                    start += n;
                }
                (t, sum / w as f64)
            })
            .collect()
    })
}

/// Boundaries that give each of `blocks` intervals an equal share of `∫ g(t) dt`, from a
/// curve sampled at equal-cell midpoints (piecewise constant, inverted linearly).
pub fn equal_share_boundaries(curve: &[(f64, f64)], blocks: usize) -> Vec<f64> {
    let k = curve.len() as f64;
    let mut cum = vec![0.0];
    for (_, g) in curve {
        cum.push(cum.last().unwrap() + g.max(1e-12) / k);
    }
    let total = *cum.last().unwrap();
    let mut out = vec![0.0];
    for b in 1..blocks {
        let target = total * b as f64 / blocks as f64;
        let cell = cum
            .iter()
            .rposition(|&c| c <= target)
            .unwrap_or(0)
            .min(curve.len() - 1);
        let frac = (target - cum[cell]) / (cum[cell + 1] - cum[cell]);
        let t = (cell as f64 + frac) / k;
        out.push((t * 1e4).round() / 1e4);
    }
    out.push(1.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_share_boundaries_split_the_integral_evenly() {
        // A flat curve splits [0, 1] evenly.
        let flat: Vec<(f64, f64)> = (0..10).map(|k| ((k as f64 + 0.5) / 10.0, 2.0)).collect();
        assert_eq!(
            equal_share_boundaries(&flat, 4),
            vec![0.0, 0.25, 0.5, 0.75, 1.0]
        );
        // g(t) = 2t (loss grows with t): equal shares at t = sqrt(b/B).
        let rising: Vec<(f64, f64)> = (0..1000)
            .map(|k| ((k as f64 + 0.5) / 1000.0, 2.0 * (k as f64 + 0.5) / 1000.0))
            .collect();
        let b = equal_share_boundaries(&rising, 2);
        assert!((b[1] - 0.5f64.sqrt()).abs() < 2e-3, "{b:?}");
    }
}
