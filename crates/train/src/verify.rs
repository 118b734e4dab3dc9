//! Checks a coordinator can run on an update before it merges it.
//!
//! - **Spot check**: recompute the update from its public inputs with the worker's own
//!   [`train_delta`] and compare ([`relative_error`]) with what was sent. The codecs
//!   are lossy and carry an error-feedback residual from the worker's previous lease,
//!   so equality is out of reach; [`spot_check_tolerance`] gives a bound per codec,
//!   measured (numbers with the function) far below what a flipped, scaled or made-up
//!   update scores. Checkable only where the checker has the shard: a worker training
//!   on its own data (`worker --data`) cannot be recomputed.
//! - **Screen**: a block's held-out loss on fixed windows with fixed masks (masked
//!   family) or fixed levels and noise (embedding family), so the versions before and
//!   after an update are compared on identical draws.
use blocktrain_model::config::ModelConfig;
use blocktrain_model::data::{heldout_windows, Split};
use blocktrain_model::objective::masked::{self, MaskNoise};
use blocktrain_model::objective::{ar, edm, Draw};
use blocktrain_model::run::Manifest;
use blocktrain_model::trainer::Objective;
use blocktrain_model::transformer::Denoiser;
use blocktrain_protocol::codec::{Arrays, Codec};
use tch::{nn, Device, Kind, Tensor};

use crate::local_train::{torch_rng, train_delta, LocalJob};
use crate::{NodeError, Result};

/// `||claimed - recomputed|| / max(||recomputed||, 1e-12)`, L2 over all tensors together.
/// A tensor only one side has counts in full; one whose length differs makes the
/// error infinite.
pub fn relative_error(claimed: &Arrays, recomputed: &Arrays) -> f64 {
    let sq = |v: &[f32]| v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
    let mut diff = 0.0;
    for (name, r) in recomputed {
        match claimed.get(name) {
            Some(c) if c.data.len() != r.data.len() => return f64::INFINITY,
            Some(c) => {
                diff += c
                    .data
                    .iter()
                    .zip(&r.data)
                    .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                    .sum::<f64>()
            }
            None => diff += sq(&r.data),
        }
    }
    for (name, c) in claimed {
        if !recomputed.contains_key(name) {
            diff += sq(&c.data);
        }
    }
    let norm = recomputed.values().map(|a| sq(&a.data)).sum::<f64>().sqrt();
    diff.sqrt() / norm.max(1e-12)
}

/// The largest [`relative_error`] an honest update sent in `codec` should show, when
/// the checker recomputes on the worker's device type (CPU checked; see below).
///
/// An honest update differs from its recomputation only by the codec: the worker sends
/// `Q(delta + e_prev)`, so the difference is `e_prev - e_new`, two quantisation errors.
/// Measured (`tests/verify.rs`, `measure_spot_check_errors`; tiny d16 H8 and demo d128
/// 2 layers H50 batch 32, second lease of a worker, and ten leases in a row):
///
/// | codec | honest | bound | flipped / x3 / noise | same base, other data |
/// |---|---|---|---|---|
/// | fp32 | 0 (bit-identical) | 1e-3 | 2.0 / 2.0 / 1.41 | 0.5-0.6 |
/// | fp16 | 2.3e-4..3.1e-4 | 5e-3 | same | same |
/// | int8:256 | 4.4e-3..5.9e-3 | 5e-2 | same | same |
/// | topk:0.1 | 0.98, growing with the residual | none (infinite) | 1.13-1.34 | 0.94-0.96 |
///
/// CPU recomputes were bit-identical in one process, across processes and between 1
/// and 2 intra-op threads. The bounds leave 8x-16x headroom for rounding a different
/// device or library would add (a CUDA worker against a CPU checker is not measured:
/// check such updates on a like device, or treat a miss as a reason for a second look).
/// top-k sends a tenth and owes the rest to later leases, so its residual is as large as
/// the update and an honest update is about as far from its recomputation as a forged
/// one: it cannot be spot-checked, and its bound is infinite (every check passes).
pub fn spot_check_tolerance(codec: &Codec) -> f64 {
    match codec {
        Codec::Fp32 => 1e-3,
        Codec::Fp16 => 5e-3,
        Codec::Int8 { .. } => 5e-2,
        Codec::TopK { .. } => f64::INFINITY,
    }
}

/// What recomputing one update found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpotCheck {
    /// [`relative_error`] of the claimed delta against the recomputed one.
    pub error: f64,
    /// The bound it was held to ([`spot_check_tolerance`]).
    pub tolerance: f64,
    /// Mean training loss of the recomputation (what an honest worker reports).
    pub loss: f64,
}

impl SpotCheck {
    /// Whether the claimed delta is within the bound.
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// Recomputes `job` on `device` and compares the result with `claimed` (the decoded
/// upload), held to the tolerance of `codec`, the codec it was sent in.
pub fn spot_check(
    job: &LocalJob,
    claimed: &Arrays,
    codec: &Codec,
    device: Device,
) -> Result<SpotCheck> {
    let trained = train_delta(job, device, &|| true)?
        .expect("training without a stop condition always finishes");
    let loss = trained.loss;
    let recomputed = trained.update(job);
    // Weights, first and second moments each on their own scale: second moments are
    // orders of magnitude smaller, and a forged one must not hide under the weights' norm.
    let group = |a: &Arrays, prefix: Option<&str>| -> Arrays {
        a.iter()
            .filter(|(n, _)| match prefix {
                Some(p) => n.starts_with(p),
                None => !crate::moments::is_moment(n),
            })
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    };
    let mut groups = vec![None];
    if job.lease.carry_moments {
        groups.extend(crate::moments::PREFIXES.map(Some));
    }
    let error = groups
        .into_iter()
        .map(|p| relative_error(&group(claimed, p), &group(&recomputed, p)))
        .fold(0.0, f64::max);
    Ok(SpotCheck {
        error,
        tolerance: spot_check_tolerance(codec),
        loss,
    })
}

/// A block's held-out loss on fixed windows of the valid split with fixed masks
/// (seeded), so two versions are compared on identical draws: the difference of two
/// [`Screen::loss`] values is the update's effect, not Monte-Carlo noise.
#[derive(Debug)]
pub struct Screen {
    vs: nn::VarStore,
    net: Denoiser,
    /// (W, T) held-out windows on the device.
    x: Tensor,
    draws: Draws,
}

/// The screen's fixed randomness, on the device.
#[derive(Debug)]
enum Draws {
    /// Levels (W) and masks of the masked family, and the interval's width.
    Masked {
        t: Tensor,
        noise: MaskNoise,
        width: f64,
    },
    /// Levels (W) and noise (W, T, e) of the embedding family.
    Latent { sigma: Tensor, eps: Tensor },
    /// The AR NLL draws nothing.
    None,
}

/// Windows per forward pass (bounds activation memory on large screens).
const SCREEN_BATCH: i64 = 64;

impl Screen {
    /// `windows` evenly spaced windows (0 = all) of the run's valid split for `block`,
    /// with levels and masks drawn from `seed`.
    pub fn new(
        manifest: &Manifest,
        block: usize,
        windows: usize,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let valid = manifest.plan.dataset.load(Split::Valid)?;
        Self::from_bytes(manifest, block, &valid, windows, seed, device)
    }

    /// As [`Screen::new`], on held-out bytes the caller already has.
    pub fn from_bytes(
        manifest: &Manifest,
        block: usize,
        heldout: &[u8],
        windows: usize,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let state = manifest.parts.get(block).ok_or_else(|| {
            NodeError::Config(format!(
                "no block {} in a run of {}",
                block + 1,
                manifest.parts.len()
            ))
        })?;
        let cfg: ModelConfig = manifest.part_model(block);
        let x = heldout_windows(heldout, cfg.window, windows);
        let (n, len) = (x.size()[0], cfg.window);
        if n == 0 {
            return Err(NodeError::Config(format!(
                "held-out split of {} bytes has no window of {len}",
                heldout.len()
            )));
        }
        let vs = nn::VarStore::new(device);
        let (net, draws) = {
            // The draws are made on the CPU so they do not depend on the device; the
            // initial weights are never used (every loss() loads its own).
            let _rng = torch_rng();
            tch::manual_seed(seed as i64);
            let net = Denoiser::new(&vs.root(), &cfg);
            let draws = match (state.objective, &cfg.edm) {
                (Objective::Interval { lo, hi }, _) => {
                    let t = masked::draw_t(n, lo, hi, Draw::Stratified, Device::Cpu);
                    let noise = MaskNoise::draw(n, len, Device::Cpu);
                    Draws::Masked {
                        t: t.to_device(device),
                        noise: MaskNoise {
                            uniforms: noise.uniforms.to_device(device),
                            forced: noise.forced.to_device(device),
                        },
                        width: hi - lo,
                    }
                }
                (Objective::Edm { lo, hi }, Some(edm_cfg)) => {
                    let sigma = edm::draw_sigma(edm_cfg, n, lo, hi, Draw::Stratified, Device::Cpu);
                    let eps = edm::draw_eps(&x, edm_cfg.embed_dim);
                    Draws::Latent {
                        sigma: sigma.to_device(device),
                        eps: eps.to_device(device),
                    }
                }
                (Objective::Autoregressive, _) => Draws::None,
                (objective, edm) => {
                    return Err(NodeError::Config(format!(
                        "block {} has objective {objective:?} but edm settings {edm:?}",
                        block + 1
                    )))
                }
            };
            (net, draws)
        };
        Ok(Screen {
            vs,
            net,
            x: x.to_device(device),
            draws,
        })
    }

    /// Windows scored per call.
    pub fn windows(&self) -> usize {
        self.x.size()[0] as usize
    }

    /// Mean held-out loss of `weights` (the block's names and shapes), nats per byte:
    /// the block's share of the ELBO (interval estimate times width), the paper's
    /// denoising CE on the block's interval (embedding family), or the AR NLL.
    /// Draws no randomness, so equal weights give equal values.
    pub fn loss(&self, weights: &Arrays) -> Result<f64> {
        let device = self.x.device();
        let incoming = weights
            .iter()
            .map(|(name, a)| {
                let shape: Vec<i64> = a.shape.iter().map(|&d| d as i64).collect();
                let t = Tensor::from_slice(&a.data)
                    .view(&shape[..])
                    .to_device(device);
                (name.clone(), t)
            })
            .collect();
        let live = self.vs.variables().into_iter().collect();
        blocktrain_model::checkpoint::load_strict(&live, &incoming)?;
        let n = self.x.size()[0];
        let sum = tch::no_grad(|| {
            let mut sum = 0.0;
            let mut start = 0;
            while start < n {
                let k = SCREEN_BATCH.min(n - start);
                let x = self.x.narrow(0, start, k);
                let per_row = match &self.draws {
                    Draws::Masked { t, noise, width } => {
                        let noise = MaskNoise {
                            uniforms: noise.uniforms.narrow(0, start, k),
                            forced: noise.forced.narrow(0, start, k),
                        };
                        let t = t.narrow(0, start, k);
                        masked::estimate_with(&self.net, &x, &t, &noise, *width)
                    }
                    Draws::Latent { sigma, eps } => edm::ce_at(
                        &self.net,
                        &x,
                        &sigma.narrow(0, start, k),
                        &eps.narrow(0, start, k),
                    ),
                    Draws::None => ar::ar_nll(&self.net, &x),
                };
                sum += per_row.sum(Kind::Double).double_value(&[]);
                start += k;
            }
            sum
        });
        Ok(sum / n as f64)
    }
}
