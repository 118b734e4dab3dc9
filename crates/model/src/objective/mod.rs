//! The training objectives, one file per family, each with the same small interface: a
//! block's training loss on its slice of the noise axis, and held-out estimators whose
//! per-block shares add up to the family's whole bound.
//!
//! - [`masked`]: absorbing-state byte diffusion; a block owns a masking-rate interval
//!   `[t(b-1), t(b)]` and its share of the ELBO (our family).
//! - [`edm`]: Gaussian diffusion of byte embeddings with EDM preconditioning, as the
//!   BlockTrain paper runs it (DiffusionBlocks); a block owns a sigma interval, is trained
//!   on the EDM-weighted cross-entropy, and owns a share of a VDM-style likelihood bound.
//! - [`ar`]: the causal reference's exact NLL.
//!
//! Estimators take the network through a small trait ([`MaskedNet`], [`edm::LatentNet`])
//! so that tests can check them against denoisers whose exact answer is known.
use tch::{Kind, Tensor};

use crate::transformer::Denoiser;

pub mod ar;
pub mod edm;
pub mod masked;

/// How a batch's noise levels are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Draw {
    /// One shared offset, one stratum per row (lower variance; training).
    Stratified,
    /// Independent per row (each row's estimate unbiased alone; evaluation).
    Independent,
}

/// `n` levels in [0, 1): stratified (`(i + u) / n`, one shared `u`) or independent.
pub fn unit_draws(n: i64, draw: Draw, device: tch::Device) -> Tensor {
    match draw {
        Draw::Stratified => stratified_unit(n, &Tensor::rand([1], (Kind::Float, device))),
        Draw::Independent => Tensor::rand([n], (Kind::Float, device)),
    }
}

/// `(i + u) / n` for rows i in 0..n: row i in stratum i. With n = B·M rows, rows
/// `bM..(b+1)M` get exactly the levels block b would draw for M rows with the same
/// `u`: the decomposition tests rely on this.
pub fn stratified_unit(n: i64, u: &Tensor) -> Tensor {
    (Tensor::arange(n, (Kind::Float, u.device())) + u) / n as f64
}

/// Per-position NLL (N, T) of the true bytes `x` under `logits` (N, T, 256).
pub fn token_nll(logits: &Tensor, x: &Tensor) -> Tensor {
    -logits
        .log_softmax(-1, Kind::Float)
        .gather(-1, &x.unsqueeze(-1), false)
        .squeeze_dim(-1)
}

/// A network that predicts bytes from partly masked ids: (N, T) ids with MASK and
/// levels t (N) give logits (N, T, 256).
pub trait MaskedNet {
    /// Byte logits at every position.
    fn masked_logits(&self, tokens: &Tensor, t: &Tensor) -> Tensor;
}

impl MaskedNet for Denoiser {
    fn masked_logits(&self, tokens: &Tensor, t: &Tensor) -> Tensor {
        self.forward(tokens, Some(t))
    }
}
