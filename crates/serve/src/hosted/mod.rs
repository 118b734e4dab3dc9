//! The model side of a block server: which networks it holds and what it computes.
//!
//! Three families:
//! - **block** (masked diffusion): the server holds blocks `first..=last` of a
//!   block-local run and runs each one's local denoising, highest block first. Block b
//!   samples from its own stream of the request seed, so the output does not depend on
//!   which replica ran which block.
//! - **edm** (embedding diffusion, the paper's family): the same, but what crosses
//!   between stages is the latent z at the boundary's sigma; the top block draws the
//!   starting noise from its stream, block 1 reads the bytes out at sigma_min.
//! - **ar** (the baseline): the server holds layers `first..=last` of the AR reference;
//!   the first stage also embeds bytes, the last also applies the head and samples.
//!   Keys/values of past positions stay in a
//!   [`KvCache`](blocktrain_model::transformer::KvCache) per session.
//!
//! Weights come from a run directory or, with a logical shape, are random (seeded): the
//! cost of serving does not depend on the values of the weights.
//!
//! Here: the types and the dispatch; `load` (run directory, logical shape), `masked`,
//! `edm` and `ar` (each family's compute).
use std::ops::Range;
use std::path::Path;

use blocktrain_model::config::{EdmConfig, Schedule};
use blocktrain_model::logical::LogicalShape;
use blocktrain_model::sampler::SampleSettings;
use blocktrain_model::transformer::Denoiser;
use blocktrain_protocol::frame::{BlockRange, LatentState, Sampling, ServerInfo};
use tch::{nn, Device, Kind};

use crate::ServeError;

/// Where a server's weights come from.
#[derive(Clone, Debug)]
pub enum Source<'a> {
    /// A run directory written by training (block, e2e or ar family).
    Checkpoint(&'a Path),
    /// Random weights of a logical shape.
    Logical {
        /// The shape of one block (diffusion) or of the whole layer stack's layers (ar).
        shape: &'a LogicalShape,
        /// Serve AR layers instead of diffusion blocks.
        ar: bool,
        /// Blocks (or AR layers) in the whole logical model.
        total: u32,
        /// Seeds the weights.
        seed: i64,
        /// Diffusion: layer applications of each block, `total` entries (block b has
        /// `block_layers[b - 1]`, overriding the shape's `layers`), so a model's depth can
        /// split unevenly; None: every block has the shape's. Part of the model id.
        block_layers: Option<&'a [u32]>,
    },
}

struct Net {
    _vs: nn::VarStore,
    net: Denoiser,
}

enum Role {
    Blocks {
        /// `nets[i]` is block `first + i`.
        nets: Vec<Net>,
        schedule: Schedule,
    },
    Latent {
        /// `nets[i]` is block `first + i`.
        nets: Vec<Net>,
        /// Block boundaries as fractions of the lognormal's mass.
        schedule: Schedule,
        edm: EdmConfig,
    },
    Ar {
        net: Box<Net>,
        /// Indices into `net`'s layers.
        layers: Range<usize>,
        embed: bool,
        head: bool,
        kind: Kind,
    },
}

/// What a server hosts, ready to compute.
pub struct Hosted {
    /// What it tells clients.
    pub info: ServerInfo,
    role: Role,
    device: Device,
}

/// What an AR stage produced.
#[derive(Debug)]
pub enum ArStepOut {
    /// Hidden states for the next stage: (rows, d) row-major.
    Hidden(Vec<f32>, u32),
    /// The sampled byte (last stage), with its log-probabilities when they were asked for.
    Byte(u8, Option<blocktrain_protocol::frame::ByteLogprobs>),
}

fn bad(m: impl Into<String>) -> ServeError {
    ServeError::Config(m.into())
}

/// A request this server cannot take as sent (the sender's to fix, not a server fault).
fn refused(m: impl Into<String>) -> ServeError {
    ServeError::Rejected(m.into())
}

/// A short content id of the weights a route must agree on.
fn model_id(parts: &str) -> String {
    blake3::hash(parts.as_bytes()).to_hex()[..16].to_string()
}

mod ar;
mod edm;
mod load;
mod masked;

impl Hosted {
    /// Loads `blocks` (1-based, inclusive; layers for the AR family) from `source`.
    pub fn load(
        source: Source<'_>,
        blocks: BlockRange,
        device: Device,
        max_tokens: u32,
    ) -> Result<Hosted, ServeError> {
        match source {
            Source::Checkpoint(path) => Self::from_run(path, blocks, device, max_tokens),
            Source::Logical {
                shape,
                ar,
                total,
                seed,
                block_layers,
            } => Self::logical(
                shape,
                ar,
                total,
                seed,
                block_layers,
                blocks,
                device,
                max_tokens,
            ),
        }
    }

    /// The width of the latent an edm stage hands on (None for the other families).
    pub fn latent_width(&self) -> Option<u32> {
        match &self.role {
            Role::Latent { edm, .. } => Some(edm.embed_dim as u32),
            _ => None,
        }
    }

    /// Runs this server's blocks, highest first, on `tokens` (bytes or MASK) and, for the
    /// embedding family, the latent the stage above handed on. Returns the tokens (all
    /// bytes once block 1 has run) and the latent to hand on (embedding family, above
    /// block 1).
    pub fn denoise(
        &self,
        tokens: &[u16],
        latent: Option<&LatentState>,
        sampling: &Sampling,
        seed: u64,
    ) -> Result<(Vec<u16>, Option<LatentState>), ServeError> {
        let settings = settings(sampling);
        match &self.role {
            Role::Blocks { nets, schedule } => {
                self.denoise_masked(nets, schedule, tokens, latent, &settings, seed)
            }
            Role::Latent {
                nets,
                schedule,
                edm,
            } => self.denoise_latent(nets, schedule, edm, tokens, latent, &settings, seed),
            Role::Ar { .. } => Err(bad("this server hosts AR layers, not diffusion blocks")),
        }
    }
}

/// One diffusion request of a batch: what [`Hosted::denoise`] takes.
#[derive(Clone, Debug)]
pub struct DenoiseJob {
    /// Bytes or MASK.
    pub tokens: Vec<u16>,
    /// The latent the stage above handed on (embedding family).
    pub latent: Option<LatentState>,
    /// The request's sampling settings.
    pub sampling: Sampling,
    /// The request's seed.
    pub seed: u64,
}

/// What one diffusion request's result is.
pub type DenoiseOut = Result<(Vec<u16>, Option<LatentState>), ServeError>;

/// What requests must share to be computed in one batch: the sequence length (no
/// padding: bucketed by length), steps per block and, for the embedding family,
/// Heun's steps (they change the network's evaluations). Temperature and top-k are
/// each row's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchKey {
    /// Tokens (prompt + output).
    pub len: usize,
    /// Steps per block.
    pub steps: u32,
    /// Heun's steps (embedding family; always false for masked blocks).
    pub heun: bool,
}

impl BatchKey {
    /// The batch a request with `len` tokens and `sampling` may join, on a server of
    /// the embedding family (`latent`) or not.
    pub fn new(len: usize, sampling: &Sampling, latent: bool) -> BatchKey {
        BatchKey {
            len,
            steps: sampling.steps_per_block.max(1),
            heun: sampling.heun && latent,
        }
    }
}

impl Hosted {
    /// The batch a request with `len` tokens and `sampling` may join here.
    pub fn batch_key(&self, len: usize, sampling: &Sampling) -> BatchKey {
        BatchKey::new(len, sampling, matches!(self.role, Role::Latent { .. }))
    }

    /// [`Hosted::denoise`] for several requests at once: requests of one
    /// [`BatchKey`] share each network evaluation, and each gets exactly what it gets
    /// alone (its own random streams; see ARCHITECTURE.md on when a batched matmul
    /// equals the lone one bit for bit). One result per job, in order; a job this
    /// server cannot take gets its error and the others go on. Jobs of different keys
    /// are computed in one batch per key.
    pub fn denoise_batch(&self, jobs: &[DenoiseJob]) -> Vec<DenoiseOut> {
        let mut out: Vec<Option<DenoiseOut>> = jobs.iter().map(|_| None).collect();
        let keys: Vec<BatchKey> = jobs
            .iter()
            .map(|j| self.batch_key(j.tokens.len(), &j.sampling))
            .collect();
        let mut left: Vec<usize> = (0..jobs.len()).collect();
        while let Some(&head) = left.first() {
            let (group, rest): (Vec<usize>, Vec<usize>) =
                left.iter().partition(|&&i| keys[i] == keys[head]);
            let rows: Vec<&DenoiseJob> = group.iter().map(|&i| &jobs[i]).collect();
            let results = match &self.role {
                Role::Blocks { nets, schedule } => self.masked_batch(nets, schedule, &rows),
                Role::Latent {
                    nets,
                    schedule,
                    edm,
                } => self.latent_batch(nets, schedule, edm, &rows),
                Role::Ar { .. } => rows
                    .iter()
                    .map(|_| Err(bad("this server hosts AR layers, not diffusion blocks")))
                    .collect(),
            };
            for (i, r) in group.into_iter().zip(results) {
                out[i] = Some(r);
            }
            left = rest;
        }
        out.into_iter()
            .map(|r| r.expect("every job is in one group"))
            .collect()
    }
}

fn settings(s: &Sampling) -> SampleSettings {
    SampleSettings {
        steps_per_block: s.steps_per_block as usize,
        temperature: s.temperature,
        top_k: s.top_k as i64,
        top_p: s.top_p,
        heun: s.heun,
    }
}

fn check_range(r: BlockRange, total: u32, what: &str, src: &Path) -> Result<(), ServeError> {
    if r.last > total {
        return Err(bad(format!(
            "--blocks {r}: {} has {total} {what} (numbered 1..{total})",
            src.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod batch_tests;
#[cfg(test)]
mod tests;
