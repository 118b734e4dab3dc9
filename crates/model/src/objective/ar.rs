//! The autoregressive reference: causal attention, exact next-byte NLL.
use tch::{Kind, Tensor};

use super::token_nll;
use crate::transformer::Denoiser;
use crate::MASK_ID;

/// Exact autoregressive NLL per row (N), nats per byte: position i predicts byte i from
/// bytes before it; position 0 sees only the start token (MASK id doubles as BOS).
pub fn ar_nll(net: &Denoiser, x: &Tensor) -> Tensor {
    let (n, len) = x.size2().unwrap();
    let bos = Tensor::full([n, 1], MASK_ID, (Kind::Int64, x.device()));
    let input = Tensor::cat(&[bos, x.narrow(1, 0, len - 1)], 1); // (N, T) shifted right
    token_nll(&net.forward(&input, None), x).mean_dim(1, false, Kind::Float)
}
