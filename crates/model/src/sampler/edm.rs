//! Embedding diffusion: one pass over the block stack in embedding space.
//!
//! The output starts as Gaussian noise at sigma_max (the prior of the bound, variance
//! `sigma_max^2 + sigma_data^2`). Each block integrates the probability-flow ODE
//! `dz/dsigma = (z - D(z; sigma)) / sigma` over its own sigma interval, from the top
//! down, in `steps_per_block` Euler steps (or Heun's) spaced evenly in the training
//! lognormal's mass (DiffusionBlocks' schedule), with `D = softmax(logits) . E`. Block 1
//! ends at sigma_min and reads the bytes off its logits there (a sample at the request's
//! temperature and top-k). So one traversal of the stack yields the whole output, and
//! what crosses between blocks is the latent z (T x e) at the boundary's sigma.
//!
//! A prompt is known clean data: at its positions D is the prompt's own embedding, so
//! they move on the straight line `e + sigma * eps0` that the ODE follows for known data,
//! and the network sees them at the same noise level as everything else.
//!
//! Randomness: the initial noise comes from the top block's stream and the read-out from
//! its own stream ([`SampleRng::for_readout`]); the ODE itself draws nothing. Between
//! blocks the latent is rounded to f16 ([`hand_off`]), as it crosses between block
//! servers, so one host and a route of servers sample the same bytes.
use tch::{Device, Kind, Tensor};

use super::{sample_bytes, SampleRng, SampleSettings};
use crate::config::{EdmConfig, Schedule};
use crate::objective::edm::{expected_embedding, LatentNet};
use crate::transformer::Denoiser;

/// The starting latent (1, T, e) for `prompt` followed by `len` output positions: the
/// prompt's embedding plus noise at sigma_max, pure noise of the prior's variance for
/// the output. Drawn from `rng` in position order.
pub fn initial_latent(
    table: &Tensor,
    cfg: &EdmConfig,
    prompt: &[u8],
    len: usize,
    rng: &mut SampleRng,
    device: Device,
) -> Tensor {
    let e = cfg.embed_dim;
    let total = (prompt.len() + len) as i64;
    let eps = Tensor::from_slice(&rng.normals((total * e) as usize))
        .view([1, total, e])
        .to_device(device);
    let prior_std = (cfg.sigma_max.powi(2) + cfg.sigma_data.powi(2)).sqrt();
    let clean = prompt_embedding(table, prompt, total, device);
    let keep = output_positions(prompt.len(), total, device);
    &clean + &eps * (&keep * prior_std + (1.0 - &keep) * cfg.sigma_max)
}

/// (1, T, e): the prompt's clean embedding at its positions, 0 after them.
fn prompt_embedding(table: &Tensor, prompt: &[u8], total: i64, device: Device) -> Tensor {
    let e = table.size()[1];
    let out = Tensor::zeros([1, total, e], (Kind::Float, device));
    if !prompt.is_empty() {
        let ids: Vec<i64> = prompt.iter().map(|&b| b as i64).collect();
        let rows = table.index_select(0, &Tensor::from_slice(&ids).to_device(device));
        out.narrow(1, 0, prompt.len() as i64)
            .copy_(&rows.unsqueeze(0));
    }
    out
}

/// (1, T, 1): 1 at output positions, 0 at the prompt's.
fn output_positions(prompt_len: usize, total: i64, device: Device) -> Tensor {
    let p = prompt_len as i64;
    Tensor::cat(
        &[
            Tensor::zeros([1, p, 1], (Kind::Float, device)),
            Tensor::ones([1, total - p, 1], (Kind::Float, device)),
        ],
        1,
    )
}

/// The levels one block steps through: `steps + 1` values from the top of its mass
/// interval `[u_lo, u_hi]` down to the bottom, evenly spaced in mass.
pub fn step_levels(cfg: &EdmConfig, u_lo: f64, u_hi: f64, steps: usize) -> Vec<f64> {
    let k = steps.max(1);
    (0..=k)
        .map(|j| cfg.sigma_at(u_hi - (u_hi - u_lo) * j as f64 / k as f64))
        .collect()
}

/// The latent as it crosses from one block to the next: rounded to f16 (what the wire
/// carries: 2 bytes per value), back in f32.
pub fn hand_off(z: &Tensor) -> Tensor {
    z.to_kind(Kind::Half).to_kind(Kind::Float)
}

/// Network evaluations one block makes for `steps` steps (Heun: two per step).
pub fn evaluations(steps: usize, heun: bool) -> usize {
    steps.max(1) * if heun { 2 } else { 1 }
}

/// Runs one block's steps on the latent `z` (1, T, e) from mass `u_hi` down to `u_lo`;
/// `prompt` holds the bytes at the first positions. Returns the latent at the bottom.
pub fn denoise_sigma_interval(
    net: &Denoiser,
    z: &Tensor,
    prompt: &[u8],
    u_lo: f64,
    u_hi: f64,
    s: &SampleSettings,
) -> Tensor {
    let cfg = net.config().edm.as_ref().expect("an edm network");
    let device = z.device();
    let total = z.size()[1];
    let table = net.table();
    let clean = prompt_embedding(table, prompt, total, device);
    let keep = output_positions(prompt.len(), total, device);
    // D(z; sigma): the network's expected embedding, the prompt's own at its positions.
    let denoise = |z: &Tensor, sigma: f64| {
        let level = Tensor::full([1], sigma, (Kind::Float, device));
        let x_hat = expected_embedding(&net.latent_logits(z, &level), table);
        &x_hat * &keep + &clean * (1.0 - &keep)
    };
    let levels = step_levels(cfg, u_lo, u_hi, s.steps_per_block);
    let mut z = z.to_kind(Kind::Float);
    tch::no_grad(|| {
        for w in levels.windows(2) {
            let (from, to) = (w[0], w[1]);
            let slope = (&z - denoise(&z, from)) / from;
            let euler = &z + &slope * (to - from);
            z = if s.heun {
                let slope2 = (&euler - denoise(&euler, to)) / to;
                &z + (slope + slope2) * (0.5 * (to - from))
            } else {
                euler
            };
        }
    });
    z
}

/// Reads the output bytes off the lowest block's logits at sigma_min (the positions
/// after the prompt), sampled at the request's temperature and top-k from `rng`.
pub fn readout(
    net: &Denoiser,
    z: &Tensor,
    prompt_len: usize,
    s: &SampleSettings,
    rng: &mut SampleRng,
) -> Vec<u8> {
    let cfg = net.config().edm.as_ref().expect("an edm network");
    let total = z.size()[1];
    let logits = tch::no_grad(|| {
        let level = Tensor::full([1], cfg.sigma_min, (Kind::Float, z.device()));
        net.latent_logits(&z.to_kind(Kind::Float), &level)
            .squeeze_dim(0)
            .narrow(0, prompt_len as i64, total - prompt_len as i64)
    });
    sample_bytes(&logits, s, rng)
}

/// Generates `len` bytes after `prompt` with one pass through the blocks, B down to 1:
/// `nets[b]` integrates mass interval b of `schedule`.
pub fn generate(
    nets: &[&Denoiser],
    schedule: &Schedule,
    prompt: &[u8],
    len: usize,
    settings: &SampleSettings,
    seed: u64,
    device: Device,
) -> Vec<u8> {
    let top = schedule.blocks() - 1;
    let cfg = nets[top].config().edm.as_ref().expect("edm networks");
    let mut rng = SampleRng::for_block(seed, top);
    let mut z = initial_latent(nets[top].table(), cfg, prompt, len, &mut rng, device);
    for b in (0..schedule.blocks()).rev() {
        let (u_lo, u_hi) = schedule.interval(b);
        z = denoise_sigma_interval(nets[b], &z, prompt, u_lo, u_hi, settings);
        if b > 0 {
            z = hand_off(&z);
        }
    }
    readout(
        nets[0],
        &z,
        prompt.len(),
        settings,
        &mut SampleRng::for_readout(seed),
    )
}

/// [`denoise_sigma_interval`] for several latents of one length at once: `z` (N, T, e),
/// row i continuing `prompts[i]`. The ODE draws nothing, so only the network's
/// evaluations are shared; each step's level is one value for every row, passed as a
/// one-element level so its conditioning is computed as for a row alone.
pub fn denoise_sigma_interval_batch(
    net: &Denoiser,
    z: &Tensor,
    prompts: &[&[u8]],
    u_lo: f64,
    u_hi: f64,
    s: &SampleSettings,
) -> Tensor {
    let cfg = net.config().edm.as_ref().expect("an edm network");
    let device = z.device();
    let (rows, total) = (z.size()[0], z.size()[1]);
    assert_eq!(rows, prompts.len() as i64, "one prompt per row");
    let table = net.table();
    let clean: Vec<Tensor> = prompts
        .iter()
        .map(|p| prompt_embedding(table, p, total, device))
        .collect();
    let keep: Vec<Tensor> = prompts
        .iter()
        .map(|p| output_positions(p.len(), total, device))
        .collect();
    let (clean, keep) = (Tensor::cat(&clean, 0), Tensor::cat(&keep, 0));
    let denoise = |z: &Tensor, sigma: f64| {
        let level = Tensor::full([1], sigma, (Kind::Float, device));
        let x_hat = expected_embedding(&net.latent_logits(z, &level), table);
        &x_hat * &keep + &clean * (1.0 - &keep)
    };
    let levels = step_levels(cfg, u_lo, u_hi, s.steps_per_block);
    let mut z = z.to_kind(Kind::Float);
    tch::no_grad(|| {
        for w in levels.windows(2) {
            let (from, to) = (w[0], w[1]);
            let slope = (&z - denoise(&z, from)) / from;
            let euler = &z + &slope * (to - from);
            z = if s.heun {
                let slope2 = (&euler - denoise(&euler, to)) / to;
                &z + (slope + slope2) * (0.5 * (to - from))
            } else {
                euler
            };
        }
    });
    z
}

/// [`readout`] for a batch: one evaluation of the lowest block on `z` (N, T, e), then
/// row i's bytes after its `prompt_lens[i]` drawn with its own settings and stream.
pub fn readout_batch(
    net: &Denoiser,
    z: &Tensor,
    prompt_lens: &[usize],
    settings: &[&SampleSettings],
    rngs: &mut [SampleRng],
) -> Vec<Vec<u8>> {
    let cfg = net.config().edm.as_ref().expect("an edm network");
    let total = z.size()[1];
    assert!(
        prompt_lens.len() == z.size()[0] as usize
            && settings.len() == prompt_lens.len()
            && rngs.len() == prompt_lens.len(),
        "one prompt length, settings and stream per row"
    );
    let logits = tch::no_grad(|| {
        let level = Tensor::full([1], cfg.sigma_min, (Kind::Float, z.device()));
        net.latent_logits(&z.to_kind(Kind::Float), &level)
    });
    prompt_lens
        .iter()
        .zip(settings)
        .zip(rngs.iter_mut())
        .enumerate()
        .map(|(r, ((&p, s), rng))| {
            let row = logits.get(r as i64).narrow(0, p as i64, total - p as i64);
            sample_bytes(&row, s, rng)
        })
        .collect()
}
