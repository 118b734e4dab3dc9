//! Generation: each block unmasks its share of the sequence locally.
//!
//! The output span starts fully masked (t = 1). Block B takes `steps` denoising steps
//! from t(B) down to t(B-1), then hands the bytes and the mask (MASK ids) to block B-1,
//! and so on. A step from s to s' < s reveals each still-masked byte with probability
//! (s - s') / s, drawn from the block's prediction; the last block ends at 0, where
//! that probability is 1, so one pass over the stack yields the whole output.
//!
//! All randomness comes from an explicit [`SampleRng`] per block (or per AR byte), never
//! from libtorch's global generator: blocks of one request may run on different hosts
//! and requests on different threads, and each still draws exactly the same numbers.
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::config::Schedule;
use crate::transformer::{Denoiser, KvCache};
use crate::{MASK_ID, OUTPUT_VOCAB};

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

/// Explicit random stream for sampling (ChaCha8).
#[derive(Clone, Debug)]
pub struct SampleRng(ChaCha8Rng);

/// AR streams start here so they never meet a block's stream (blocks are < 2^32).
const AR_STREAM_BASE: u64 = 1 << 32;

impl SampleRng {
    /// The stream block `block` (0-based interval index) uses for request `seed`.
    pub fn for_block(seed: u64, block: usize) -> Self {
        Self::stream(seed, block as u64)
    }

    /// The stream the AR sampler uses for the byte at absolute position `pos`.
    pub fn for_ar(seed: u64, pos: u64) -> Self {
        Self::stream(seed, AR_STREAM_BASE + pos)
    }

    fn stream(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        SampleRng(rng)
    }

    /// Uniform in the open interval (0, 1): 53 random bits, offset by half a step.
    fn uniform(&mut self) -> f64 {
        ((self.0.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// `n` standard Gumbel draws.
    fn gumbels(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| -(-self.uniform().ln()).ln() as f32)
            .collect()
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

/// Samples one byte per row of `logits` (N, 256) with temperature/top-k (gumbel-max with
/// noise from `rng`).
pub fn sample_bytes(logits: &Tensor, s: &SampleSettings, rng: &mut SampleRng) -> Vec<u8> {
    let (n, width) = logits.size2().expect("logits are (N, 256)");
    assert_eq!(width, OUTPUT_VOCAB, "logits are (N, 256)");
    if n == 0 {
        return Vec::new();
    }
    let scaled = logits.to_kind(Kind::Float) / s.temperature.max(1e-6);
    let noise = Tensor::from_slice(&rng.gumbels((n * width) as usize))
        .view([n, width])
        .to_device(logits.device());
    let picks = (top_k(&scaled, s.top_k) + noise).argmax(-1, false);
    let picks: Vec<i64> = Vec::try_from(picks.to_device(Device::Cpu)).expect("int64 argmax");
    picks.into_iter().map(|b| b as u8).collect()
}

/// Runs one block's local denoising on `tokens` (1, T) int64 from level `hi` to `lo`.
/// Unmasked positions (prompt, earlier blocks' output) are never changed.
///
/// Each step draws one uniform per still-masked position (in position order) to pick
/// the positions it reveals, then byte noise for those positions only; a step that
/// reveals nothing skips the network.
pub fn denoise_interval(
    net: &Denoiser,
    tokens: &Tensor,
    lo: f64,
    hi: f64,
    s: &SampleSettings,
    rng: &mut SampleRng,
) -> Tensor {
    let device = tokens.device();
    assert_eq!(
        tokens.size()[0],
        1,
        "denoise_interval takes one sequence (1, T)"
    );
    let mut ids: Vec<i64> =
        Vec::try_from(tokens.view([-1]).to_device(Device::Cpu)).expect("int64 tokens");
    let steps = s.steps_per_block.max(1);
    tch::no_grad(|| {
        for j in 0..steps {
            let from = hi - (hi - lo) * j as f64 / steps as f64;
            let to = hi - (hi - lo) * (j + 1) as f64 / steps as f64;
            let p_reveal = if to <= 0.0 { 1.0 } else { (from - to) / from };
            let masked: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == MASK_ID).collect();
            if masked.is_empty() {
                break;
            }
            let reveal: Vec<i64> = masked
                .into_iter()
                .filter(|_| rng.uniform() < p_reveal)
                .map(|i| i as i64)
                .collect();
            if reveal.is_empty() {
                continue;
            }
            let x = Tensor::from_slice(&ids).view([1, -1]).to_device(device);
            let t = Tensor::full([1], from, (Kind::Float, device));
            let logits = net.forward(&x, Some(&t)).squeeze_dim(0); // (T, 256)
            let at = Tensor::from_slice(&reveal).to_device(device);
            let bytes = sample_bytes(&logits.index_select(0, &at), s, rng);
            for (&i, b) in reveal.iter().zip(bytes) {
                ids[i as usize] = b as i64;
            }
        }
    });
    Tensor::from_slice(&ids).view([1, -1]).to_device(device)
}

/// Generates `len` bytes after `prompt` with one pass through the blocks, B down to 1.
/// `nets[b]` denoises interval b (the same network may serve every interval) with the
/// stream [`SampleRng::for_block`]`(seed, b)`.
pub fn generate(
    nets: &[&Denoiser],
    schedule: &Schedule,
    prompt: &[u8],
    len: usize,
    settings: &SampleSettings,
    seed: u64,
    device: Device,
) -> Vec<u8> {
    let mut ids: Vec<i64> = prompt.iter().map(|&b| b as i64).collect();
    ids.extend(std::iter::repeat_n(MASK_ID, len));
    let mut tokens = Tensor::from_slice(&ids).view([1, -1]).to_device(device);
    for b in (0..schedule.blocks()).rev() {
        let (lo, hi) = schedule.interval(b);
        let mut rng = SampleRng::for_block(seed, b);
        tokens = denoise_interval(nets[b], &tokens, lo, hi, settings, &mut rng);
    }
    let out: Vec<i64> =
        Vec::try_from(tokens.view([-1]).to_device(Device::Cpu)).expect("int64 tokens");
    out[prompt.len()..].iter().map(|&v| v as u8).collect()
}

/// Autoregressive sampling from the AR reference with a KV cache; output byte `p`
/// (0-based) is drawn with [`SampleRng::for_ar`]`(seed, p)`.
///
/// The context starts with the start token (MASK) and the prompt, cut to the last
/// `window` ids. Rotary positions stay inside the trained window: when the context
/// would outgrow it, the cache is rebuilt from the last `window / 2` ids, so every byte
/// sees between `window / 2` and `window` ids of context.
pub fn generate_ar(
    net: &Denoiser,
    prompt: &[u8],
    len: usize,
    s: &SampleSettings,
    seed: u64,
    device: Device,
) -> Vec<u8> {
    let window = (net.config().window as usize).max(2);
    let mut ids: Vec<i64> = std::iter::once(MASK_ID)
        .chain(prompt.iter().map(|&b| b as i64))
        .collect();
    let layers = 0..net.n_layers();
    let mut cache = KvCache::new();
    let mut start = ids.len().saturating_sub(window); // id at the cache's position 0
    tch::no_grad(|| {
        for p in 0..len {
            if ids.len() - start > window {
                start = ids.len() - window / 2;
                cache = KvCache::new();
            }
            let fresh = &ids[start + cache.positions() as usize..];
            let x = Tensor::from_slice(fresh).view([1, -1]).to_device(device);
            let h = net.forward_layers_cached(layers.clone(), &net.embed(&x), &mut cache);
            let logits = net.head_logits(&h.narrow(1, -1, 1)).view([1, OUTPUT_VOCAB]);
            let mut rng = SampleRng::for_ar(seed, p as u64);
            ids.push(sample_bytes(&logits, s, &mut rng)[0] as i64);
        }
    });
    ids[1 + prompt.len()..].iter().map(|&v| v as u8).collect()
}
