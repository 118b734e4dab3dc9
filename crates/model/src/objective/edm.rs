//! Embedding-space Gaussian diffusion, the BlockTrain paper's objective (DiffusionBlocks
//! with EDM), and an honest likelihood bound for it.
//!
//! **Forward process.** Byte x has a fixed embedding e(x) (a seeded table shared by every
//! block, never trained, so no block trains a tensor another block reads), and
//! `z = e(x) + sigma * eps`, independently per position.
//!
//! **Network.** EDM preconditioning (Karras et al. 2022, Table 1) around the raw network
//! F: `D = c_skip z + c_out F(c_in z, c_noise)` is a denoised latent, the head turns D into
//! byte logits, and the denoised embedding the sampler and the bound use is
//! `x_hat = softmax(logits) . E`.
//!
//! **Training** (DiffusionBlocks): sigma from the lognormal `ln sigma ~ N(p_mean, p_std^2)`
//! restricted to the block's interval (widened by the overlap), loss
//! `lambda(sigma) * CE(x | z)` with EDM's weight `lambda = (sigma^2 + sd^2) / (sigma sd)^2`.
//! The blocks split `[sigma_min, sigma_max]` into equal lognormal mass
//! ([`crate::config::EdmConfig::sigma_bounds`]).
//!
//! **The paper's metric** is the unweighted CE of the clean byte, with sigma drawn from
//! the training distribution: [`ce_at`], [`ce_estimate`]. It falls as more of the byte
//! shows through z (target leakage), so it is not a likelihood.
//!
//! **The bound** (VDM, Kingma et al. 2021, continuous time, variance exploding:
//! SNR = 1/sigma^2), per byte:
//! `-log p(x) <= prior + diffusion + reconstruction`, where
//! - prior = `KL(q(z_max | x) || N(0, (sigma_max^2 + sd^2) I))`, closed form ([`prior_kl`]);
//! - diffusion = `∫_{sigma_min}^{sigma_max} E |e(x) - x_hat(z_sigma)|^2 / sigma^3 dsigma`,
//!   an integral over sigma, so it splits over the blocks' intervals exactly
//!   ([`diffusion_share`]);
//! - reconstruction = `E -log p(x | z_{sigma_min})` with the lowest block's own byte
//!   prediction as the decoder ([`reconstruction`]).
//!
//! Block 1 owns the reconstruction term, block B the prior, and each block its slice of
//! the diffusion integral ([`block_share`]), so the shares add up to the bound.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::{Device, Kind, Tensor};

use super::{token_nll, unit_draws, Draw};
use crate::config::EdmConfig;
use crate::transformer::Denoiser;
use crate::OUTPUT_VOCAB;

/// The fixed byte embedding (256, e) of `cfg`: standard normal entries from ChaCha8
/// seeded by `embed_seed` (pure Rust, so every host and device builds the same table),
/// each row scaled to norm `sqrt(e) * sigma_data`, so every coordinate has RMS
/// sigma_data (what EDM's preconditioning assumes) and every byte is equally far from 0.
pub fn byte_table(cfg: &EdmConfig, device: Device) -> Tensor {
    let e = cfg.embed_dim as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.embed_seed);
    let mut rows = Vec::with_capacity(OUTPUT_VOCAB as usize * e);
    for _ in 0..OUTPUT_VOCAB {
        let row: Vec<f64> = (0..e).map(|_| StandardNormal.sample(&mut rng)).collect();
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        let scale = (e as f64).sqrt() * cfg.sigma_data / norm;
        rows.extend(row.iter().map(|v| (v * scale) as f32));
    }
    Tensor::from_slice(&rows)
        .view([OUTPUT_VOCAB, cfg.embed_dim])
        .to_device(device)
}

/// A network that predicts bytes from a noisy latent: z (N, T, e) at levels sigma (N)
/// gives logits (N, T, 256). It carries the byte table its latent lives around.
pub trait LatentNet {
    /// The fixed byte embedding (256, e).
    fn table(&self) -> &Tensor;
    /// Byte logits at every position.
    fn latent_logits(&self, z: &Tensor, sigma: &Tensor) -> Tensor;
}

/// EDM's preconditioning coefficients for per-row levels sigma (N), each (N).
#[derive(Debug)]
pub struct Precond {
    /// Input scale `1 / sqrt(sigma^2 + sd^2)`: the network sees unit-variance inputs.
    pub c_in: Tensor,
    /// Skip weight `sd^2 / (sigma^2 + sd^2)`: how much of z passes straight to D.
    pub c_skip: Tensor,
    /// Output scale `sigma sd / sqrt(sigma^2 + sd^2)`.
    pub c_out: Tensor,
    /// Noise feature `ln(sigma) / 4`.
    pub c_noise: Tensor,
}

/// The coefficients at `sigma` (N) for data RMS `sigma_data`.
pub fn precondition(sigma_data: f64, sigma: &Tensor) -> Precond {
    let sd2 = sigma_data * sigma_data;
    let total = sigma.square() + sd2; // (N)
    Precond {
        c_in: total.rsqrt(),
        c_skip: total.reciprocal() * sd2,
        c_out: sigma * sigma_data * total.rsqrt(),
        c_noise: sigma.log() / 4.0,
    }
}

/// What the network's sinusoidal level features read: EDM's `c_noise`, divided by the
/// span of `c_noise` over the run's sigma range when that span exceeds 1. The features
/// (frequencies (k+1) pi) repeat with period 2, so this keeps two levels of the range
/// from looking alike; for the default [1, 10] (span 0.58) it is `c_noise` itself.
pub fn noise_feature(cfg: &EdmConfig, c_noise: &Tensor) -> Tensor {
    let span = (cfg.sigma_max / cfg.sigma_min).ln() / 4.0;
    c_noise / span.max(1.0)
}

/// EDM's loss weight `lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2` (N).
pub fn loss_weight(sigma_data: f64, sigma: &Tensor) -> Tensor {
    let sd2 = sigma_data * sigma_data;
    (sigma.square() + sd2) / (sigma.square() * sd2)
}

/// (N) -> (N, 1, 1), to scale (N, T, e) latents row by row.
fn per_row(v: &Tensor) -> Tensor {
    v.view([-1, 1, 1])
}

impl LatentNet for Denoiser {
    fn table(&self) -> &Tensor {
        self.byte_table()
            .expect("a latent network is built with an edm config")
    }

    fn latent_logits(&self, z: &Tensor, sigma: &Tensor) -> Tensor {
        let cfg = self.config().edm.as_ref().expect("an edm network");
        // Preconditioning in f32; the network runs in its weights' precision.
        let kind = self.param_kind();
        let z = z.to_kind(Kind::Float);
        let p = precondition(cfg.sigma_data, &sigma.to_kind(Kind::Float));
        let f = self
            .forward_latent(
                &(&z * per_row(&p.c_in)).to_kind(kind),
                &noise_feature(cfg, &p.c_noise),
            )
            .to_kind(Kind::Float);
        let denoised = &z * per_row(&p.c_skip) + f * per_row(&p.c_out); // (N, T, e)
        self.head_from_latent(&denoised.to_kind(kind))
            .to_kind(Kind::Float)
    }
}

/// Levels in `[lo, hi]` distributed as the training lognormal restricted to it (N):
/// stratified or independent in mass, mapped through the lognormal's quantile function.
pub fn draw_sigma(cfg: &EdmConfig, n: i64, lo: f64, hi: f64, draw: Draw, device: Device) -> Tensor {
    let unit = unit_draws(n, draw, device).to_kind(Kind::Double);
    sigma_from_unit(cfg, lo, hi, &unit)
}

/// The restricted lognormal's quantiles at mass fractions `unit` (N) of `[lo, hi]`.
pub fn sigma_from_unit(cfg: &EdmConfig, lo: f64, hi: f64, unit: &Tensor) -> Tensor {
    let within = EdmConfig {
        sigma_min: lo,
        sigma_max: hi,
        ..cfg.clone()
    };
    let (qa, qb) = within.mass_range();
    let q = unit.to_kind(Kind::Double) * (qb - qa) + qa;
    // Phi^-1(q) = sqrt(2) erfinv(2q - 1), in f64 so the tails keep their digits.
    let z = (q * 2.0 - 1.0).erfinv() * std::f64::consts::SQRT_2;
    (z * cfg.p_std + cfg.p_mean)
        .exp()
        .clamp(lo, hi)
        .to_kind(Kind::Float)
}

/// The noisy latent `e(x) + sigma * eps` (N, T, e) for bytes x (N, T), levels (N) and
/// standard normal noise `eps` (N, T, e).
pub fn noisy(table: &Tensor, x: &Tensor, sigma: &Tensor, eps: &Tensor) -> Tensor {
    table.index_select(0, &x.view([-1])).view_as(eps) + eps * per_row(sigma)
}

/// Standard normal noise for a batch of bytes x (N, T) and embedding width `e`.
pub fn draw_eps(x: &Tensor, e: i64) -> Tensor {
    let (n, len) = x.size2().expect("bytes are (N, T)");
    Tensor::randn([n, len, e], (Kind::Float, x.device()))
}

/// The training loss of a block over `[lo, hi]` (its interval, widened by the overlap):
/// the batch mean of `lambda(sigma) * CE(x | z_sigma)`, sigma stratified in mass.
pub fn interval_loss(net: &Denoiser, x: &Tensor, lo: f64, hi: f64) -> Tensor {
    let cfg = net.config().edm.as_ref().expect("an edm network");
    let (a, b) = cfg.training_range(lo, hi);
    let sigma = draw_sigma(cfg, x.size()[0], a, b, Draw::Stratified, x.device());
    let eps = draw_eps(x, cfg.embed_dim);
    let ce = ce_at(net, x, &sigma, &eps);
    (ce * loss_weight(cfg.sigma_data, &sigma)).mean(Kind::Float)
}

/// Unweighted CE (N) of the clean bytes x (N, T) at levels sigma (N) with noise eps,
/// nats per byte: the paper's metric at one draw.
pub fn ce_at(net: &(impl LatentNet + ?Sized), x: &Tensor, sigma: &Tensor, eps: &Tensor) -> Tensor {
    let z = noisy(net.table(), x, sigma, eps);
    token_nll(&net.latent_logits(&z, sigma), x).mean_dim(1, false, Kind::Float)
}

/// The paper's CE per row (N) for the interval `[lo, hi]`: sigma from the training
/// lognormal restricted to it, no overlap (a block is scored where it is used).
pub fn ce_estimate(
    net: &(impl LatentNet + ?Sized),
    cfg: &EdmConfig,
    x: &Tensor,
    lo: f64,
    hi: f64,
    draw: Draw,
) -> Tensor {
    let sigma = draw_sigma(cfg, x.size()[0], lo, hi, draw, x.device());
    let eps = draw_eps(x, net.table().size()[1]);
    ce_at(net, x, &sigma, &eps)
}

/// The denoised embedding `softmax(logits) . E` (N, T, e).
pub fn expected_embedding(logits: &Tensor, table: &Tensor) -> Tensor {
    logits
        .softmax(-1, Kind::Float)
        .matmul(&table.to_kind(Kind::Float))
}

/// The diffusion term's integrand `|e(x) - x_hat(z_sigma)|^2` (N): squared error summed
/// over embedding coordinates, averaged over positions.
fn denoising_error(
    net: &(impl LatentNet + ?Sized),
    x: &Tensor,
    sigma: &Tensor,
    eps: &Tensor,
) -> Tensor {
    let table = net.table();
    let z = noisy(table, x, sigma, eps);
    let x_hat = expected_embedding(&net.latent_logits(&z, sigma), table);
    let clean = table.index_select(0, &x.view([-1])).view_as(&x_hat);
    (clean - x_hat)
        .square()
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean_dim(1, false, Kind::Float)
}

/// The diffusion share (N) of an interval at given levels: with ln sigma uniform on the
/// interval (width `log_width` in ln sigma), `∫ f(sigma) / sigma^3 dsigma` is
/// `log_width * E[f(sigma) / sigma^2]`.
pub fn diffusion_share_with(
    net: &(impl LatentNet + ?Sized),
    x: &Tensor,
    sigma: &Tensor,
    eps: &Tensor,
    log_width: f64,
) -> Tensor {
    denoising_error(net, x, sigma, eps) / sigma.square() * log_width
}

/// Levels with ln sigma uniform on `[ln lo, ln hi]` (N).
pub fn log_uniform_sigma(n: i64, lo: f64, hi: f64, draw: Draw, device: Device) -> Tensor {
    (unit_draws(n, draw, device) * (hi / lo).ln() + lo.ln()).exp()
}

/// The diffusion share (N) of `[lo, hi]` at one Monte-Carlo draw per row.
pub fn diffusion_share(
    net: &(impl LatentNet + ?Sized),
    x: &Tensor,
    lo: f64,
    hi: f64,
    draw: Draw,
) -> Tensor {
    let sigma = log_uniform_sigma(x.size()[0], lo, hi, draw, x.device());
    let eps = draw_eps(x, net.table().size()[1]);
    diffusion_share_with(net, x, &sigma, &eps, (hi / lo).ln())
}

/// The reconstruction term (N): `-log p(x | z)` at `sigma_min` with noise eps, the
/// network's own byte prediction as the decoder (any decoder keeps the bound valid).
pub fn reconstruction(
    net: &(impl LatentNet + ?Sized),
    x: &Tensor,
    sigma_min: f64,
    eps: &Tensor,
) -> Tensor {
    let sigma = Tensor::full([x.size()[0]], sigma_min, (Kind::Float, x.device()));
    ce_at(net, x, &sigma, eps)
}

/// The prior term (N), exact: `KL(N(e(x), sigma_max^2 I) || N(0, s^2 I))` per position,
/// `s^2 = sigma_max^2 + sigma_data^2` (the latent's variance at sigma_max), averaged over
/// positions. Needs no network: it is how much of x is left at sigma_max.
pub fn prior_kl(table: &Tensor, cfg: &EdmConfig, x: &Tensor) -> Tensor {
    let (n, len) = x.size2().expect("bytes are (N, T)");
    let var_q = cfg.sigma_max * cfg.sigma_max;
    let var_p = var_q + cfg.sigma_data * cfg.sigma_data;
    let e = table.size()[1] as f64;
    let sq = table
        .index_select(0, &x.view([-1]))
        .to_kind(Kind::Float)
        .square()
        .sum_dim_intlist(-1, false, Kind::Float)
        .view([n, len]); // |e(x)|^2
    let constant = 0.5 * e * (var_q / var_p - 1.0 - (var_q / var_p).ln());
    (sq / (2.0 * var_p) + constant).mean_dim(1, false, Kind::Float)
}

/// What a block owns of the bound, by its 0-based index among `blocks`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockTerms {
    /// Its sigma interval `[lo, hi]`.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
    /// The lowest block scores the reconstruction term at sigma_min.
    pub reconstruction: bool,
    /// The highest block owns the prior term at sigma_max.
    pub prior: bool,
}

impl BlockTerms {
    /// Block `idx` of the run whose block boundaries are `sigmas` (ascending, B + 1).
    pub fn of(sigmas: &[f64], idx: usize) -> Self {
        BlockTerms {
            lo: sigmas[idx],
            hi: sigmas[idx + 1],
            reconstruction: idx == 0,
            prior: idx + 2 == sigmas.len(),
        }
    }
}

/// One Monte-Carlo estimate (N) of a block's share of the bound, nats per byte.
pub fn block_share(
    net: &(impl LatentNet + ?Sized),
    cfg: &EdmConfig,
    terms: BlockTerms,
    x: &Tensor,
    draw: Draw,
) -> Tensor {
    let mut share = diffusion_share(net, x, terms.lo, terms.hi, draw);
    if terms.reconstruction {
        let eps = draw_eps(x, cfg.embed_dim);
        share += reconstruction(net, x, cfg.sigma_min, &eps);
    }
    if terms.prior {
        share += prior_kl(net.table(), cfg, x);
    }
    share
}
