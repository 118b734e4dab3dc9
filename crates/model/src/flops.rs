//! Parameter and FLOP estimates (PaLM appendix B / nanoGPT `estimate_mfu` form).
use crate::config::ModelConfig;
use crate::OUTPUT_VOCAB;

/// Parameters in matrix multiplies (attention, MLP, output head; for embedding
/// diffusion also the latent's in and out projections); lookup tables excluded.
pub fn matmul_params(cfg: &ModelConfig) -> i64 {
    let d = cfg.d_model;
    let per_layer = 4 * d * d + 2 * cfg.mlp_ratio * d * d;
    let ends = match &cfg.edm {
        // in_proj (e x d), out_proj (d x e), head (e x 256)
        Some(edm) => 2 * edm.embed_dim * d + edm.embed_dim * OUTPUT_VOCAB,
        None => d * OUTPUT_VOCAB,
    };
    cfg.n_layers * per_layer + ends
}

/// Training FLOPs per token (forward + backward): `6 N + 12 L T d`; the second term is
/// attention's score and value products over a window of T (full, not causal-halved,
/// as SDPA computes the masked half too on CPU).
pub fn train_flops_per_token(cfg: &ModelConfig) -> f64 {
    6.0 * matmul_params(cfg) as f64 + 12.0 * (cfg.n_layers * cfg.window * cfg.d_model) as f64
}

/// Forward FLOPs per token (a third of training).
pub fn forward_flops_per_token(cfg: &ModelConfig) -> f64 {
    train_flops_per_token(cfg) / 3.0
}
