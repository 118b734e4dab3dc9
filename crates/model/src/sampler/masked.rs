//! Masked diffusion: each block unmasks its share of the sequence locally.
//!
//! The output span starts fully masked (t = 1). Block B takes `steps` denoising steps
//! from t(B) down to t(B-1), then hands the bytes and the mask (MASK ids) to block B-1,
//! and so on. A step from s to s' < s reveals each still-masked byte with probability
//! (s - s') / s, drawn from the block's prediction; the last block ends at 0, where
//! that probability is 1, so one pass over the stack yields the whole output.
use tch::{Device, Kind, Tensor};

use super::{sample_bytes, SampleRng, SampleSettings};
use crate::config::Schedule;
use crate::transformer::Denoiser;
use crate::MASK_ID;

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

/// One sequence of a batch: its tokens (bytes and MASK ids), its own sampling settings
/// and its own random stream, so batching changes no row's draws.
#[derive(Debug)]
pub struct BatchRow<'a> {
    /// Token ids (T); updated in place.
    pub ids: Vec<i64>,
    /// This row's settings (temperature and top-k may differ between rows; the steps
    /// must be the batch's).
    pub settings: &'a SampleSettings,
    /// This row's stream, e.g. [`SampleRng::for_block`] of its own seed.
    pub rng: SampleRng,
}

/// [`denoise_interval`] for several sequences of one length at once: every row draws
/// from its own stream exactly what it would draw alone (its uniforms, then noise for
/// the positions it reveals, step by step), and only the network's forward passes are
/// shared: a step runs one forward over the rows that reveal something there.
///
/// Returns the forward passes it ran (at most one per step, whatever the rows).
/// Panics if the rows differ in length or in steps per block (bucket them first).
pub fn denoise_interval_batch(
    net: &Denoiser,
    rows: &mut [BatchRow<'_>],
    lo: f64,
    hi: f64,
    device: Device,
) -> usize {
    let Some(first) = rows.first() else {
        return 0;
    };
    let (len, steps) = (first.ids.len(), first.settings.steps_per_block.max(1));
    assert!(
        rows.iter()
            .all(|r| r.ids.len() == len && r.settings.steps_per_block.max(1) == steps),
        "a batch shares its length and steps per block"
    );
    // A row with nothing masked is done (the unbatched loop breaks there).
    let mut done = vec![false; rows.len()];
    let mut passes = 0;
    tch::no_grad(|| {
        for j in 0..steps {
            let from = hi - (hi - lo) * j as f64 / steps as f64;
            let to = hi - (hi - lo) * (j + 1) as f64 / steps as f64;
            let p_reveal = if to <= 0.0 { 1.0 } else { (from - to) / from };
            // (row, positions it reveals), for the rows that reveal something.
            let mut active: Vec<(usize, Vec<i64>)> = Vec::new();
            for (r, row) in rows.iter_mut().enumerate() {
                if done[r] {
                    continue;
                }
                let masked: Vec<usize> = (0..len).filter(|&i| row.ids[i] == MASK_ID).collect();
                if masked.is_empty() {
                    done[r] = true;
                    continue;
                }
                let reveal: Vec<i64> = masked
                    .into_iter()
                    .filter(|_| row.rng.uniform() < p_reveal)
                    .map(|i| i as i64)
                    .collect();
                if !reveal.is_empty() {
                    active.push((r, reveal));
                }
            }
            if active.is_empty() {
                continue;
            }
            let flat: Vec<i64> = active
                .iter()
                .flat_map(|(r, _)| rows[*r].ids.iter().copied())
                .collect();
            let n = active.len() as i64;
            let x = Tensor::from_slice(&flat).view([n, -1]).to_device(device);
            let t = Tensor::full([n], from, (Kind::Float, device));
            let logits = net.forward(&x, Some(&t)); // (n, T, 256)
            passes += 1;
            for (k, (r, reveal)) in active.iter().enumerate() {
                let row = &mut rows[*r];
                let at = Tensor::from_slice(reveal).to_device(device);
                let picked = logits.get(k as i64).index_select(0, &at);
                let bytes = sample_bytes(&picked, row.settings, &mut row.rng);
                for (&i, b) in reveal.iter().zip(bytes) {
                    row.ids[i as usize] = b as i64;
                }
            }
        }
    });
    passes
}
