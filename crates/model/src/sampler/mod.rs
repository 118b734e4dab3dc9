//! Generation: one pass over the block stack, each block running its own local steps.
//!
//! - [`masked`]: the output starts fully masked; each block unmasks its share.
//! - [`edm`]: the output starts as Gaussian noise in embedding space; each block
//!   integrates the probability-flow ODE over its sigma interval (Euler, or Heun).
//! - [`ar`]: the causal reference, byte by byte with a KV cache.
//!
//! All randomness comes from an explicit [`SampleRng`] per block (or per AR byte), never
//! from libtorch's global generator: blocks of one request may run on different hosts
//! and requests on different threads, and each still draws exactly the same numbers.
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::{Device, Kind, Tensor};

use crate::OUTPUT_VOCAB;

pub mod ar;
pub mod edm;
pub mod masked;

pub use ar::generate_ar;

/// Denoising steps per block when nobody says: the judge's choice on valid
/// (docs/RESULTS.md 8b). Both families gain up to 32, the masked sampler nothing from 64;
/// 16 is half the cost for about 0.03 nats/byte of judge NLL.
pub const DEFAULT_STEPS_PER_BLOCK: usize = 32;
pub use masked::{denoise_interval, generate};

/// Sampling knobs.
#[derive(Clone, Debug)]
pub struct SampleSettings {
    /// Denoising steps each block takes over its interval.
    pub steps_per_block: usize,
    /// Softmax temperature (> 0).
    pub temperature: f64,
    /// Keep only the k most likely bytes (0 = all 256).
    pub top_k: i64,
    /// Embedding diffusion: Heun's second-order steps instead of Euler's (two network
    /// evaluations per step).
    pub heun: bool,
}

impl Default for SampleSettings {
    fn default() -> Self {
        SampleSettings {
            steps_per_block: DEFAULT_STEPS_PER_BLOCK,
            temperature: 1.0,
            top_k: 0,
            heun: false,
        }
    }
}

/// Explicit random stream for sampling (ChaCha8).
#[derive(Clone, Debug)]
pub struct SampleRng(ChaCha8Rng);

/// AR streams start here so they never meet a block's stream (blocks are < 2^32).
const AR_STREAM_BASE: u64 = 1 << 32;
/// The embedding family's final read-out draws from this stream (past every AR byte's).
const READOUT_STREAM: u64 = u64::MAX;

impl SampleRng {
    /// The stream block `block` (0-based interval index) uses for request `seed`.
    pub fn for_block(seed: u64, block: usize) -> Self {
        Self::stream(seed, block as u64)
    }

    /// The stream the AR sampler uses for the byte at absolute position `pos`.
    pub fn for_ar(seed: u64, pos: u64) -> Self {
        Self::stream(seed, AR_STREAM_BASE + pos)
    }

    /// The stream the embedding family's read-out of the final bytes uses.
    pub fn for_readout(seed: u64) -> Self {
        Self::stream(seed, READOUT_STREAM)
    }

    fn stream(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        SampleRng(rng)
    }

    /// Uniform in the open interval (0, 1): 53 random bits, offset by half a step.
    pub fn uniform(&mut self) -> f64 {
        ((self.0.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// `n` standard normal draws.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let v: f64 = StandardNormal.sample(&mut self.0);
                v as f32
            })
            .collect()
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
