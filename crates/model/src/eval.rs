//! Held-out evaluation, callers pass held-out windows only:
//! - the masked family's ELBO per interval and in total;
//! - the embedding family's VDM bound per block and in total, with its three terms;
//! - the paper's metric for both: the denoising cross-entropy of the clean byte averaged
//!   over the training distribution of the noise level (for the masked family this is
//!   the ELBO itself, see `objective::masked`);
//! - the AR reference's exact NLL.
//!
//! All with standard errors over windows. A fixed seed makes every model of a family
//! see the same noise draws.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::{EdmConfig, Schedule};
use crate::objective::edm::{self, BlockTerms};
use crate::objective::{ar, masked, Draw};
use crate::transformer::Denoiser;

/// A mean over windows and its standard error.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Estimate {
    /// Mean nats per byte.
    pub nats: f64,
    /// Standard error over windows.
    pub se: f64,
}

/// One block's interval and its share of the bound.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Share {
    /// Lower end: t(b-1) (masked) or sigma(b-1) (embedding diffusion).
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
    /// Mean nats per byte: this block's share of the bound.
    pub nats: f64,
    /// Standard error of `nats`.
    pub se: f64,
    /// The paper's metric on this block's interval: mean CE of the clean byte with the
    /// level drawn from the training distribution restricted to the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce: Option<Estimate>,
}

/// The embedding family's bound, term by term (they add up to the total).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BoundTerms {
    /// KL of the latent at sigma_max from the prior (block B's).
    pub prior: Estimate,
    /// The diffusion integral over [sigma_min, sigma_max] (every block's slice).
    pub diffusion: Estimate,
    /// `-log p(x | z)` at sigma_min with block 1 as the decoder (block 1's).
    pub reconstruction: Estimate,
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
    /// The paper's CE over the whole training distribution (diffusion families).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce: Option<Estimate>,
    /// The embedding family's bound term by term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms: Option<BoundTerms>,
}

impl Report {
    /// Bits per byte.
    pub fn bits(&self) -> f64 {
        self.nats / std::f64::consts::LN_2
    }
}

fn estimate(values: &Tensor) -> Estimate {
    let (nats, se) = mean_se(values);
    Estimate { nats, se }
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
                    let est = masked::interval_estimate(*net, &x, lo, hi, Draw::Independent);
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
    // t is uniform in training, so a block's mean masked CE over its interval is its
    // share over its width, and the mean over all of [0, 1] is the ELBO itself.
    let shares: Vec<Share> = (0..blocks)
        .map(|b| {
            let (lo, hi) = schedule.interval(b as usize);
            let (nats, se) = mean_se(&per_window.select(1, b));
            let ce = Some(Estimate {
                nats: nats / (hi - lo),
                se: se / (hi - lo),
            });
            Share {
                lo,
                hi,
                nats,
                se,
                ce,
            }
        })
        .collect();
    let (nats, se) = mean_se(&per_window.sum_dim_intlist(1, false, Kind::Double));
    Report {
        windows: w as usize,
        samples,
        shares,
        nats,
        se,
        ce: Some(Estimate { nats, se }),
        terms: None,
    }
}

/// Runs `f` on every batch of `windows` on `device`, writing its (N) result into rows
/// `start..start + n` of column `col` of `acc` (W, C), scaled by `scale`.
fn accumulate(
    acc: &Tensor,
    col: i64,
    windows: &Tensor,
    settings: &EvalSettings,
    scale: f64,
    f: &mut dyn FnMut(&Tensor) -> Tensor,
    progress: &mut dyn FnMut(u64),
) {
    let w = windows.size()[0];
    let mut start = 0;
    while start < w {
        let n = settings.batch.min(w - start);
        let x = windows.narrow(0, start, n).to_device(settings.device);
        let est = f(&x).to_device(Device::Cpu).to_kind(Kind::Double) * scale;
        let mut slot = acc.narrow(0, start, n).select(1, col);
        let _ = slot.g_add_(&est);
        progress(n as u64);
        start += n;
    }
}

/// The embedding family's held-out bound and the paper's CE on `windows` (W, T): block
/// b (0-based) is scored by `nets[b]` on its sigma interval of the mass `schedule` (the
/// same network may serve every block, as for E2E). `samples` independent draws per
/// window and block; the seed fixes them. `progress` counts windows scored.
pub fn edm_bound(
    nets: &[&Denoiser],
    cfg: &EdmConfig,
    schedule: &Schedule,
    windows: &Tensor,
    settings: &EvalSettings,
    progress: &mut dyn FnMut(u64),
) -> Report {
    assert_eq!(nets.len(), schedule.blocks(), "one network per block");
    let w = windows.size()[0];
    let blocks = schedule.blocks();
    let sigmas = cfg.sigma_bounds(schedule);
    tch::manual_seed(settings.seed);
    // Columns: diffusion share per block, then CE per block, then reconstruction, prior.
    let b = blocks as i64;
    let acc = Tensor::zeros([w, 2 * b + 2], (Kind::Double, Device::Cpu));
    let per_sample = 1.0 / settings.samples as f64;
    tch::no_grad(|| {
        for (idx, net) in nets.iter().enumerate() {
            let terms = BlockTerms::of(&sigmas, idx);
            for _ in 0..settings.samples {
                let (lo, hi) = (terms.lo, terms.hi);
                let mut diffusion =
                    |x: &Tensor| edm::diffusion_share(*net, x, lo, hi, Draw::Independent);
                accumulate(
                    &acc,
                    idx as i64,
                    windows,
                    settings,
                    per_sample,
                    &mut diffusion,
                    progress,
                );
                let mut ce = |x: &Tensor| edm::ce_estimate(*net, cfg, x, lo, hi, Draw::Independent);
                accumulate(
                    &acc,
                    b + idx as i64,
                    windows,
                    settings,
                    per_sample,
                    &mut ce,
                    &mut |_| {},
                );
                if terms.reconstruction {
                    let mut recon = |x: &Tensor| {
                        let eps = edm::draw_eps(x, cfg.embed_dim);
                        edm::reconstruction(*net, x, cfg.sigma_min, &eps)
                    };
                    accumulate(
                        &acc,
                        2 * b,
                        windows,
                        settings,
                        per_sample,
                        &mut recon,
                        &mut |_| {},
                    );
                }
            }
            if terms.prior {
                let mut prior = |x: &Tensor| edm::prior_kl(edm::LatentNet::table(*net), cfg, x);
                accumulate(
                    &acc,
                    2 * b + 1,
                    windows,
                    settings,
                    1.0,
                    &mut prior,
                    &mut |_| {},
                );
            }
        }
    });
    let column = |c: i64| acc.select(1, c);
    let share_of = |idx: usize| {
        let mut v = column(idx as i64).copy(); // a copy: += on a view would write into acc
        if idx == 0 {
            v += column(2 * b);
        }
        if idx + 1 == blocks {
            v += column(2 * b + 1);
        }
        v
    };
    let shares = (0..blocks)
        .map(|idx| {
            let (nats, se) = mean_se(&share_of(idx));
            Share {
                lo: sigmas[idx],
                hi: sigmas[idx + 1],
                nats,
                se,
                ce: Some(estimate(&column(b + idx as i64))),
            }
        })
        .collect();
    let total = acc.sum_dim_intlist(1, false, Kind::Double)
        - acc.narrow(1, b, b).sum_dim_intlist(1, false, Kind::Double);
    let (nats, se) = mean_se(&total);
    // The whole training distribution is the mixture of the blocks' by their mass.
    let mass: Vec<f64> = (0..blocks)
        .map(|idx| {
            let (u_lo, u_hi) = schedule.interval(idx);
            u_hi - u_lo
        })
        .collect();
    let ce_total = (0..blocks)
        .map(|idx| column(b + idx as i64) * mass[idx])
        .fold(Tensor::zeros([w], (Kind::Double, Device::Cpu)), |a, c| {
            a + c
        });
    Report {
        windows: w as usize,
        samples: settings.samples,
        shares,
        nats,
        se,
        ce: Some(estimate(&ce_total)),
        terms: Some(BoundTerms {
            prior: estimate(&column(2 * b + 1)),
            diffusion: estimate(&acc.narrow(1, 0, b).sum_dim_intlist(1, false, Kind::Double)),
            reconstruction: estimate(&column(2 * b)),
        }),
    }
}

/// The paper's CE against sigma: mean CE (nats per byte) of the clean byte at each of
/// `grid` levels spaced evenly in ln sigma over `[sigma_min, sigma_max]`; `net_at(sigma)`
/// picks the network that owns the level. Low sigma shows how much leaks through z.
pub fn edm_ce_curve<'a>(
    net_at: &dyn Fn(f64) -> &'a Denoiser,
    cfg: &EdmConfig,
    windows: &Tensor,
    grid: usize,
    settings: &EvalSettings,
) -> Vec<(f64, Estimate)> {
    tch::manual_seed(settings.seed);
    let w = windows.size()[0];
    tch::no_grad(|| {
        (0..grid)
            .map(|k| {
                let frac = if grid > 1 {
                    k as f64 / (grid - 1) as f64
                } else {
                    0.0
                };
                let sigma =
                    (cfg.sigma_min.ln() + frac * (cfg.sigma_max / cfg.sigma_min).ln()).exp();
                let acc = Tensor::zeros([w, 1], (Kind::Double, Device::Cpu));
                let net = net_at(sigma);
                let mut ce = |x: &Tensor| {
                    let s = Tensor::full([x.size()[0]], sigma, (Kind::Float, x.device()));
                    edm::ce_at(net, x, &s, &edm::draw_eps(x, cfg.embed_dim))
                };
                accumulate(&acc, 0, windows, settings, 1.0, &mut ce, &mut |_| {});
                (sigma, estimate(&acc.select(1, 0)))
            })
            .collect()
    })
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
                ar::ar_nll(net, &x)
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
        ce: None,
        terms: None,
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
                    let noise = masked::MaskNoise::draw(n, x.size()[1], device);
                    let ts = Tensor::full([n], t, (Kind::Float, device));
                    sum += masked::estimate_with(net_at(t), &x, &ts, &noise, 1.0)
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
