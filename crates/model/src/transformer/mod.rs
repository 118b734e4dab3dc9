//! One block's network: a pre-norm byte transformer with rotary positions.
//!
//! The same code builds the bidirectional denoiser of a block, the end-to-end (E2E)
//! reference, (with `causal`) the autoregressive reference, and (with an `edm` config)
//! the embedding-diffusion network, which reads a noisy latent through `in_proj` and
//! hands EDM's raw output back through `out_proj`. Variable names under the `nn::Path`
//! are checkpoint keys: keep them stable.
//!
//! Files: `layers` (the pieces of a layer: [`RmsNorm`], [`Rope`], [`Attention`], [`Mlp`],
//! [`Layer`]), `denoiser` ([`Denoiser`], the whole network, and its [`KvCache`]).
mod denoiser;
mod layers;

pub use denoiser::{Denoiser, KvCache};
pub use layers::{Attention, Layer, Mlp, RmsNorm, Rope};
