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
    /// Nucleus sampling: keep the most likely bytes whose probabilities (after the
    /// temperature) sum to at least this (1 = all; Holtzman et al. 2020).
    pub top_p: f64,
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
            top_p: 1.0,
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

/// Keeps, per row, the fewest most likely entries whose softmax mass reaches `p` (the
/// nucleus; entries tied with its least likely one stay too). `p >= 1`: all.
fn top_p(logits: &Tensor, p: f64) -> Tensor {
    if p >= 1.0 {
        return logits.shallow_clone();
    }
    let probs = logits.softmax(-1, Kind::Float);
    let (sorted, _) = probs.sort(-1, true);
    // An entry is in the nucleus while the mass before it is below p (the first always is).
    let before = sorted.cumsum(-1, Kind::Float) - &sorted;
    let outside = before.ge(p);
    let floor = sorted
        .masked_fill(&outside, f64::INFINITY)
        .amin([-1].as_slice(), true);
    logits.masked_fill(&probs.lt_tensor(&floor), f64::NEG_INFINITY)
}

/// Samples one byte per row of `logits` (N, 256) with temperature, top-k and top-p
/// (gumbel-max with noise from `rng`).
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
    let picks = (top_p(&top_k(&scaled, s.top_k), s.top_p) + noise).argmax(-1, false);
    let picks: Vec<i64> = Vec::try_from(picks.to_device(Device::Cpu)).expect("int64 argmax");
    picks.into_iter().map(|b| b as u8).collect()
}

#[cfg(test)]
mod nucleus_tests {
    use super::*;

    /// Bytes drawn over many rows from logits whose softmax is 0.5, 0.3, 0.2 on bytes
    /// 0, 1, 2 (the rest never drawn).
    fn drawn(top_p: f64) -> std::collections::BTreeSet<u8> {
        let mut row = vec![f32::NEG_INFINITY; OUTPUT_VOCAB as usize];
        row[0] = 0.5f32.ln();
        row[1] = 0.3f32.ln();
        row[2] = 0.2f32.ln();
        let rows = 400;
        let logits = Tensor::from_slice(&row.repeat(rows)).view([rows as i64, OUTPUT_VOCAB]);
        let s = SampleSettings {
            top_p,
            ..SampleSettings::default()
        };
        let mut rng = SampleRng::for_block(7, 0);
        sample_bytes(&logits, &s, &mut rng).into_iter().collect()
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus_holding_p() {
        assert_eq!(drawn(1.0), [0, 1, 2].into());
        // Mass before byte 1 is 0.5 < 0.6: in; before byte 2 it is 0.8: out.
        assert_eq!(drawn(0.6), [0, 1].into());
        assert_eq!(drawn(0.4), [0].into());
        assert_eq!(drawn(0.81), [0, 1, 2].into());
    }
}
