//! Absorbing-state masking and the block-local share of the ELBO.
//!
//! With the linear schedule (alpha_t = 1 - t) the per-byte ELBO is
//! `∫_0^1 E_j E[-log p(x_j | x_t) | j masked] dt`. Block b estimates the part over its
//! interval with the *forced-mask* estimator: draw t in `[lo, hi]`, force one uniform
//! position to MASK, mask every other position with probability t, and average the
//! NLL over the k masked positions, times `hi - lo`. Given a forced position j, the
//! masked set is distributed exactly as "S given j ∈ S", so the estimate is unbiased;
//! unlike the plain `1/t` weight it is bounded, so small-t blocks do not see a heavy
//! tail. Summed over a partition of [0,1] these shares are the ELBO.
//!
//! The paper-style "mean cross-entropy over the training distribution of t" of this
//! family is the same number: t is uniform on [0, 1] in training, so the mean masked
//! CE over t is `∫ g(t) dt`, the ELBO; a block's mean CE is its share over its width.
use tch::{Kind, Tensor};

use super::{token_nll, Draw, MaskedNet};
use crate::MASK_ID;

/// A masked batch ready for the denoiser.
#[derive(Debug)]
pub struct MaskedBatch {
    /// (N, T) ids with masked positions replaced by MASK.
    pub input: Tensor,
    /// (N, T) bool, true where masked.
    pub mask: Tensor,
    /// (N) masking level of each row.
    pub t: Tensor,
}

/// Draws masking levels in `[lo, hi]` for `n` rows on `device`.
pub fn draw_t(n: i64, lo: f64, hi: f64, draw: Draw, device: tch::Device) -> Tensor {
    super::unit_draws(n, draw, device) * (hi - lo) + lo
}

/// `t_i = lo + (hi - lo) (i + u) / n`: row i in stratum i, one shared offset `u` in [0, 1).
/// With n = B·M rows on [0, 1], rows `bM..(b+1)M` get exactly the levels block b would
/// draw for M rows with the same `u`: the decomposition test relies on this.
pub fn stratified_t(n: i64, lo: f64, hi: f64, u: &Tensor) -> Tensor {
    super::stratified_unit(n, u) * (hi - lo) + lo
}

/// Randomness of one masking draw: per-position uniforms (N, T) and a forced position (N, 1).
#[derive(Debug)]
pub struct MaskNoise {
    /// Position i is masked when `uniforms[i] < t`.
    pub uniforms: Tensor,
    /// The position masked regardless of t.
    pub forced: Tensor,
}

impl MaskNoise {
    /// Fresh noise for an (n, len) batch.
    pub fn draw(n: i64, len: i64, device: tch::Device) -> Self {
        MaskNoise {
            uniforms: Tensor::rand([n, len], (Kind::Float, device)),
            forced: Tensor::randint(len, [n, 1], (Kind::Int64, device)),
        }
    }
}

/// Masks `x` (N, T) at levels `t` (N) with the given noise.
pub fn mask_with_forced(x: &Tensor, t: &Tensor, noise: &MaskNoise) -> MaskedBatch {
    let mut mask = noise.uniforms.lt_tensor(&t.unsqueeze(1)); // (N, T)
    let _ = mask.scatter_value_(1, &noise.forced, 1);
    let input = x.masked_fill(&mask, MASK_ID);
    MaskedBatch {
        input,
        mask,
        t: t.shallow_clone(),
    }
}

/// Per-row estimate (N) of the interval `[lo, hi]`'s share of the ELBO, in nats per byte.
/// Visible bytes are never scored; MASK is never a prediction target.
pub fn interval_estimate(
    net: &(impl MaskedNet + ?Sized),
    x: &Tensor,
    lo: f64,
    hi: f64,
    draw: Draw,
) -> Tensor {
    let (n, len) = x.size2().unwrap();
    let t = draw_t(n, lo, hi, draw, x.device());
    estimate_with(net, x, &t, &MaskNoise::draw(n, len, x.device()), hi - lo)
}

/// The forced-mask estimate (N) for given levels and noise, weighted by the interval width.
pub fn estimate_with(
    net: &(impl MaskedNet + ?Sized),
    x: &Tensor,
    t: &Tensor,
    noise: &MaskNoise,
    width: f64,
) -> Tensor {
    let batch = mask_with_forced(x, t, noise);
    let logits = net.masked_logits(&batch.input, &batch.t);
    masked_mean_nll(&logits, x, &batch.mask) * width
}

/// Mean NLL over each row's masked positions (N).
pub fn masked_mean_nll(logits: &Tensor, x: &Tensor, mask: &Tensor) -> Tensor {
    let maskf = mask.to_kind(Kind::Float);
    (token_nll(logits, x) * &maskf).sum_dim_intlist(1, false, Kind::Float)
        / maskf.sum_dim_intlist(1, false, Kind::Float)
}

/// The training loss of a block: the batch mean of [`interval_estimate`] (stratified t).
pub fn interval_loss(net: &(impl MaskedNet + ?Sized), x: &Tensor, lo: f64, hi: f64) -> Tensor {
    interval_estimate(net, x, lo, hi, Draw::Stratified).mean(Kind::Float)
}
