//! Block-local byte diffusion: the pure-compute half of BlockTrain.
//!
//! A model is split into **blocks**, each owning a slice of a diffusion's noise axis and
//! trained on that slice alone, so no gradient ever crosses a block boundary. Two
//! families ([`objective`]):
//! - **masked** (ours): block b owns the masking-rate interval `[t(b-1), t(b)]` of an
//!   absorbing-state byte diffusion and its share of the ELBO
//!   ([`objective::masked::interval_loss`]); the shares add up to the ELBO exactly.
//! - **edm** (the BlockTrain paper's, after DiffusionBlocks): Gaussian noise on a fixed
//!   byte embedding, EDM preconditioning, an EDM-weighted cross-entropy, blocks of equal
//!   lognormal sigma mass ([`objective::edm`]); its honest bound splits over blocks too.
//!
//! Main types:
//! - [`config::ModelConfig`] / [`config::Schedule`]: network shape and block intervals.
//! - [`transformer::Denoiser`]: one block's network (also the E2E and AR references).
//! - [`trainer::Trainer`]: one network + its own `VarStore` + its own optimizer state;
//!   isolation between blocks holds by construction, not by discipline.
//! - [`checkpoint`]: strict safetensors (de)serialisation, safe on untrusted bytes.
//! - [`sampler`]: one block's local denoising steps; [`eval`]: held-out bounds ± SE and
//!   the paper's denoising CE; [`judge`]: sample quality under an AR judge.
//! - [`logical`]: randomly initialised large shapes (f32/f16/bf16) for serving benchmarks.
//!
//! This crate never touches the network: the node crate moves its bytes.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod eval;
pub mod flops;
pub mod judge;
pub mod logical;
pub mod objective;
pub mod optim;
pub mod run;
pub mod sampler;
pub mod trainer;
pub mod transformer;

/// Input id of the absorbing MASK state (also the AR model's start-of-window token).
pub const MASK_ID: i64 = 256;
/// Input vocabulary: 256 byte values plus MASK.
pub const INPUT_VOCAB: i64 = 257;
/// Output vocabulary: a prediction is always a byte, never MASK.
pub const OUTPUT_VOCAB: i64 = 256;

/// Errors from model code that a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A checkpoint or update does not match what this model expects.
    #[error("checkpoint mismatch: {0}")]
    Mismatch(String),
    /// Bytes that are not a valid safetensors file.
    #[error("corrupt checkpoint: {0}")]
    Corrupt(String),
    /// A configuration value that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// File system trouble, with the path involved.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An error reported by libtorch.
    #[error("tensor error: {0}")]
    Tch(#[from] tch::TchError),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
