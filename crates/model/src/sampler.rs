//! Generation: each block unmasks its share of the sequence locally.
//!
//! The output span starts fully masked (t = 1). Block B takes `steps` denoising steps
//! from t(B) down to t(B-1), then hands the bytes and the mask (MASK ids) to block B-1,
//! and so on. A step from s to s' < s reveals each still-masked byte with probability
//! (s - s') / s, drawn from the block's prediction; the last block ends at 0, where
//! that probability is 1, so one pass over the stack yields the whole output.
use tch::{Device, Kind, Tensor};

use crate::config::Schedule;
use crate::transformer::Denoiser;
use crate::MASK_ID;

/// Sampling knobs.
#[derive(Clone, Debug)]
pub struct SampleSettings {
    /// Denoising steps each block takes over its interval.
    pub steps_per_block: usize,
    /// Softmax temperature (> 0).
    pub temperature: f64,
    /// Keep only the k most likely bytes (0 = all 256).
    pub top_k: i64,
}

impl Default for SampleSettings {
    fn default() -> Self {
        SampleSettings {
            steps_per_block: 32,
            temperature: 1.0,
            top_k: 0,
        }
    }
}

/// Keeps the `k` largest logits along the last dimension (0 or >= width: all).
fn top_k(logits: &Tensor, k: i64) -> Tensor {
    let width = *logits.size().last().expect("logits have a byte dimension");
    if k <= 0 || k >= width {
        return logits.shallow_clone();
    }
    let (top, _) = logits.topk(k, -1, true, true);
    let floor = top.narrow(-1, k - 1, 1); // (..., 1)
    logits.masked_fill(&logits.lt_tensor(&floor), f64::NEG_INFINITY)
}

/// Runs one block's local denoising on `tokens` (1, T) int64 from level `hi` to `lo`.
/// Unmasked positions (prompt, earlier blocks' output) are never changed.
pub fn denoise_interval(
    net: &Denoiser,
    tokens: &Tensor,
    lo: f64,
    hi: f64,
    s: &SampleSettings,
) -> Tensor {
    let device = tokens.device();
    let len = tokens.size()[1];
    let steps = s.steps_per_block.max(1);
    let mut tokens = tokens.shallow_clone();
    tch::no_grad(|| {
        for j in 0..steps {
            let from = hi - (hi - lo) * j as f64 / steps as f64;
            let to = hi - (hi - lo) * (j + 1) as f64 / steps as f64;
            let masked = tokens.eq(MASK_ID); // (1, T)
            if !bool::try_from(masked.any()).unwrap_or(false) {
                break;
            }
            let t = Tensor::full([1], from, (Kind::Float, device));
            let logits = net.forward(&tokens, Some(&t)).squeeze_dim(0) / s.temperature.max(1e-6); // (T, 256)
            let logits = top_k(&logits, s.top_k);
            let draws = logits
                .softmax(-1, Kind::Float)
                .multinomial(1, false)
                .view([1, len]); // (1, T)
            let p_reveal = if to <= 0.0 { 1.0 } else { (from - to) / from };
            let reveal =
                masked.logical_and(&Tensor::rand([1, len], (Kind::Float, device)).lt(p_reveal));
            tokens = draws.where_self(&reveal, &tokens);
        }
    });
    tokens
}

/// Generates `len` bytes after `prompt` with one pass through the blocks, B down to 1.
/// `nets[b]` denoises interval b (the same network may serve every interval).
pub fn generate(
    nets: &[&Denoiser],
    schedule: &Schedule,
    prompt: &[u8],
    len: usize,
    settings: &SampleSettings,
    seed: i64,
    device: Device,
) -> Vec<u8> {
    tch::manual_seed(seed);
    let mut ids: Vec<i64> = prompt.iter().map(|&b| b as i64).collect();
    ids.extend(std::iter::repeat_n(MASK_ID, len));
    let mut tokens = Tensor::from_slice(&ids).view([1, -1]).to_device(device);
    for b in (0..schedule.blocks()).rev() {
        let (lo, hi) = schedule.interval(b);
        tokens = denoise_interval(nets[b], &tokens, lo, hi, settings);
    }
    let out: Vec<i64> =
        Vec::try_from(tokens.view([-1]).to_device(Device::Cpu)).expect("int64 tokens");
    out[prompt.len()..].iter().map(|&v| v as u8).collect()
}

/// Autoregressive sampling from the AR reference: one forward pass per byte over the
/// last `window` bytes of context.
pub fn generate_ar(
    net: &Denoiser,
    prompt: &[u8],
    len: usize,
    s: &SampleSettings,
    seed: i64,
    device: Device,
) -> Vec<u8> {
    tch::manual_seed(seed);
    let window = net.config().window as usize;
    let mut ids: Vec<i64> = std::iter::once(MASK_ID)
        .chain(prompt.iter().map(|&b| b as i64))
        .collect();
    tch::no_grad(|| {
        for _ in 0..len {
            let ctx = &ids[ids.len().saturating_sub(window)..];
            let x = Tensor::from_slice(ctx).view([1, -1]).to_device(device);
            let logits = net.forward(&x, None).get(0).get(-1) / s.temperature.max(1e-6); // (256)
            let logits = top_k(&logits, s.top_k);
            ids.push(
                logits
                    .softmax(-1, Kind::Float)
                    .multinomial(1, false)
                    .int64_value(&[0]),
            );
        }
    });
    ids[1 + prompt.len()..].iter().map(|&v| v as u8).collect()
}
