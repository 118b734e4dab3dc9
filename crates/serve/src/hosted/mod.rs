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
//!   Keys/values of past positions stay in a [`KvCache`] per session.
//!
//! Weights come from a run directory or, with a logical shape, are random (seeded): the
//! cost of serving does not depend on the values of the weights.
use std::ops::Range;
use std::path::Path;

use blocktrain_model::config::{EdmConfig, Schedule};
use blocktrain_model::logical::LogicalShape;
use blocktrain_model::objective::edm::LatentNet;
use blocktrain_model::run::{Family, RunDir};
use blocktrain_model::sampler::{self, edm as edm_sampler, SampleRng, SampleSettings};
use blocktrain_model::transformer::{Denoiser, KvCache};
use blocktrain_protocol::frame::{
    ArPayload, BlockRange, LatentState, Sampling, ServerInfo, MASK_TOKEN,
};
use tch::{nn, Device, Kind, Tensor};

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
    /// The sampled byte (last stage).
    Byte(u8),
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
            } => Self::logical(shape, ar, total, seed, blocks, device, max_tokens),
        }
    }

    fn from_run(
        path: &Path,
        blocks: BlockRange,
        device: Device,
        max_tokens: u32,
    ) -> Result<Hosted, ServeError> {
        let run = RunDir::open(path).map_err(|e| bad(e.to_string()))?;
        let m = &run.manifest;
        let id_src = serde_json::to_string(&(
            &m.family,
            &m.model,
            &m.schedule,
            &m.block_layers,
            m.parts.iter().map(|p| &p.weights_hash).collect::<Vec<_>>(),
        ))
        .expect("manifest serialises");
        let load = |part: usize| -> Result<Net, ServeError> {
            let t = run.trained(part, device).map_err(|e| bad(e.to_string()))?;
            Ok(Net {
                _vs: t.vs,
                net: t.net,
            })
        };
        if m.family == Family::Ar {
            let total = m.model.n_layers as u32;
            check_range(blocks, total, "layers", path)?;
            let net = load(0)?;
            return Ok(Self::ar(
                net,
                blocks,
                total,
                model_id(&id_src),
                device,
                max_tokens,
            ));
        }
        let total = m.schedule.blocks() as u32;
        check_range(blocks, total, "blocks", path)?;
        let nets = (blocks.first..=blocks.last)
            .map(|b| load(m.part_for_interval(b as usize - 1)))
            .collect::<Result<Vec<_>, _>>()?;
        let (family, role) = match &m.model.edm {
            Some(edm) => (
                "edm",
                Role::Latent {
                    nets,
                    schedule: m.schedule.clone(),
                    edm: edm.clone(),
                },
            ),
            None => (
                "block",
                Role::Blocks {
                    nets,
                    schedule: m.schedule.clone(),
                },
            ),
        };
        Ok(Hosted {
            info: ServerInfo {
                model_id: model_id(&id_src),
                family: family.into(),
                blocks,
                total,
                max_tokens,
                d_model: m.model.d_model as u32,
                window: m.model.window as u32,
                served: 0,
            },
            role,
            device,
        })
    }

    fn logical(
        shape: &LogicalShape,
        ar: bool,
        total: u32,
        seed: i64,
        blocks: BlockRange,
        device: Device,
        max_tokens: u32,
    ) -> Result<Hosted, ServeError> {
        if ar && shape.embed.is_some() {
            return Err(bad(
                "an AR pipeline stage reads byte ids: drop embed= from the logical shape or --ar",
            ));
        }
        let what = if ar { "layers" } else { "blocks" };
        check_range(blocks, total, what, Path::new("the logical shape"))?;
        let id = model_id(&format!("logical:{shape}:{ar}:{total}:{seed}"));
        if ar {
            // Only the hosted layers are built: a stage never holds the others.
            let mut stage = shape.clone();
            stage.n_layers = blocks.len() as i64;
            let (vs, net) = stage.build(device, seed + blocks.first as i64, true);
            let net = Net { _vs: vs, net };
            return Ok(Self::ar_stage(
                net,
                0..blocks.len() as usize,
                blocks,
                total,
                id,
                device,
                max_tokens,
            ));
        }
        let nets = (blocks.first..=blocks.last)
            .map(|b| {
                let (vs, net) = shape.build(device, seed + b as i64, false);
                Net { _vs: vs, net }
            })
            .collect();
        let schedule = Schedule::equal(total as usize);
        let (family, role) = match shape.model_config().edm {
            Some(edm) => (
                "edm",
                Role::Latent {
                    nets,
                    schedule,
                    edm,
                },
            ),
            None => ("block", Role::Blocks { nets, schedule }),
        };
        Ok(Hosted {
            info: ServerInfo {
                model_id: id,
                family: family.into(),
                blocks,
                total,
                max_tokens,
                d_model: shape.d_model as u32,
                window: shape.window as u32,
                served: 0,
            },
            role,
            device,
        })
    }

    fn ar(
        net: Net,
        layers: BlockRange,
        total: u32,
        id: String,
        device: Device,
        max_tokens: u32,
    ) -> Hosted {
        let range = layers.first as usize - 1..layers.last as usize;
        Self::ar_stage(net, range, layers, total, id, device, max_tokens)
    }

    fn ar_stage(
        net: Net,
        range: Range<usize>,
        layers: BlockRange,
        total: u32,
        id: String,
        device: Device,
        max_tokens: u32,
    ) -> Hosted {
        let kind = net
            ._vs
            .trainable_variables()
            .first()
            .map_or(Kind::Float, |t| t.kind());
        Hosted {
            info: ServerInfo {
                model_id: id,
                family: "ar".into(),
                blocks: layers,
                total,
                max_tokens,
                d_model: net.net.config().d_model as u32,
                window: net.net.config().window as u32,
                served: 0,
            },
            role: Role::Ar {
                net: Box::new(net),
                layers: range,
                embed: layers.first == 1,
                head: layers.last == total,
                kind,
            },
            device,
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
        let first = self.info.blocks.first as usize;
        match &self.role {
            Role::Blocks { nets, schedule } => {
                if latent.is_some() {
                    return Err(refused(
                        "this server hosts masked-diffusion blocks and takes no latent",
                    ));
                }
                let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
                let mut x = Tensor::from_slice(&ids)
                    .view([1, -1])
                    .to_device(self.device);
                for (i, net) in nets.iter().enumerate().rev() {
                    let idx = first + i - 1; // 0-based interval
                    let (lo, hi) = schedule.interval(idx);
                    let mut rng = SampleRng::for_block(seed, idx);
                    x = sampler::denoise_interval(&net.net, &x, lo, hi, &settings, &mut rng);
                }
                let out: Vec<i64> = Vec::try_from(x.view([-1]).to_device(Device::Cpu))
                    .map_err(|e| bad(format!("reading tokens back: {e}")))?;
                Ok((out.into_iter().map(|v| v as u16).collect(), None))
            }
            Role::Latent {
                nets,
                schedule,
                edm,
            } => self.denoise_latent(nets, schedule, edm, tokens, latent, &settings, seed),
            Role::Ar { .. } => Err(bad("this server hosts AR layers, not diffusion blocks")),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn denoise_latent(
        &self,
        nets: &[Net],
        schedule: &Schedule,
        edm: &EdmConfig,
        tokens: &[u16],
        latent: Option<&LatentState>,
        settings: &SampleSettings,
        seed: u64,
    ) -> Result<(Vec<u16>, Option<LatentState>), ServeError> {
        // The prompt is the leading bytes; every position after it is output.
        let prompt_len = tokens
            .iter()
            .position(|&t| t >= MASK_TOKEN)
            .ok_or_else(|| refused("nothing to generate: no masked position"))?;
        if tokens[prompt_len..].iter().any(|&t| t != MASK_TOKEN) {
            return Err(refused(
                "embedding diffusion continues a prompt: masked positions must all follow it",
            ));
        }
        let prompt: Vec<u8> = tokens[..prompt_len].iter().map(|&t| t as u8).collect();
        let (n, e) = (tokens.len(), edm.embed_dim);
        let (first, last) = (self.info.blocks.first, self.info.blocks.last);
        let expect_sigma = edm.sigma_at(schedule.interval(last as usize - 1).1);
        let z = match latent {
            None if last == self.info.total => {
                let mut rng = SampleRng::for_block(seed, last as usize - 1);
                let table = nets.last().expect("a stage hosts a block").net.table();
                edm_sampler::initial_latent(
                    table,
                    edm,
                    &prompt,
                    n - prompt_len,
                    &mut rng,
                    self.device,
                )
            }
            None => {
                return Err(refused(format!(
                    "blocks {first}..{last} continue from a latent the stage above sends; none came"
                )))
            }
            Some(_) if last == self.info.total => {
                return Err(refused(
                    "the top stage starts from the prior and takes no latent",
                ))
            }
            Some(z) => {
                if z.width as i64 != e || z.values.len() != n * e as usize {
                    return Err(refused(format!(
                        "latent of width {} with {} values: this model needs {n} x {e}",
                        z.width,
                        z.values.len()
                    )));
                }
                if (z.sigma - expect_sigma).abs() > 1e-6 * expect_sigma {
                    return Err(refused(format!(
                        "latent at sigma {}: blocks {first}..{last} start at sigma {expect_sigma}",
                        z.sigma
                    )));
                }
                Tensor::from_slice(&z.values)
                    .view([1, n as i64, e])
                    .to_device(self.device)
            }
        };
        let mut z = z;
        for (i, net) in nets.iter().enumerate().rev() {
            let block = first as usize + i; // 1-based
            let (u_lo, u_hi) = schedule.interval(block - 1);
            z = edm_sampler::denoise_sigma_interval(&net.net, &z, &prompt, u_lo, u_hi, settings);
            if block > 1 {
                // As on one host: the latent is rounded to f16 between any two blocks,
                // whether the next one is here or on the next server.
                z = edm_sampler::hand_off(&z);
            }
        }
        if first == 1 {
            let mut rng = SampleRng::for_readout(seed);
            let bytes = edm_sampler::readout(&nets[0].net, &z, prompt_len, settings, &mut rng);
            let out = prompt.iter().chain(&bytes).map(|&b| b as u16).collect();
            return Ok((out, None));
        }
        let values: Vec<f32> =
            Vec::try_from(z.to_kind(Kind::Float).to_device(Device::Cpu).view([-1]))
                .map_err(|e| bad(format!("reading the latent back: {e}")))?;
        let state = LatentState {
            width: e as u32,
            sigma: edm.sigma_at(schedule.interval(first as usize - 1).0),
            values,
        };
        Ok((tokens.to_vec(), Some(state)))
    }

    /// One AR step of this stage: embeds (first stage) or takes hidden states, runs its
    /// layers against `cache`, and hands on hidden states or samples the byte.
    /// `hidden` is the (rows, width) the frame declared for hidden states.
    pub fn ar_step(
        &self,
        cache: &mut KvCache,
        payload: &ArPayload,
        hidden: Option<(u32, u32)>,
        sampling: &Sampling,
        seed: u64,
        output_index: u64,
    ) -> Result<ArStepOut, ServeError> {
        let Role::Ar {
            net,
            layers,
            embed,
            head,
            kind,
        } = &self.role
        else {
            return Err(bad("this server hosts diffusion blocks, not AR layers"));
        };
        let d = self.info.d_model as i64;
        let x = match (payload, embed) {
            (ArPayload::Tokens(t), true) => {
                if t.iter().any(|&v| v > MASK_TOKEN) {
                    return Err(bad("token ids must be bytes or MASK"));
                }
                let ids: Vec<i64> = t.iter().map(|&v| v as i64).collect();
                net.net.embed(
                    &Tensor::from_slice(&ids)
                        .view([1, -1])
                        .to_device(self.device),
                )
            }
            (ArPayload::Hidden(_), false) if hidden.is_none_or(|(_, w)| w as i64 != d) => {
                return Err(bad(format!(
                    "hidden states of width {:?}: this model's width is {d}",
                    hidden.map(|(_, w)| w)
                )))
            }
            (ArPayload::Hidden(h), false) => Tensor::from_slice(h)
                .view([1, -1, d])
                .to_device(self.device)
                .to_kind(*kind),
            (ArPayload::Tokens(_), false) => {
                return Err(bad("this AR stage takes hidden states, not bytes"))
            }
            (ArPayload::Hidden(_), true) => {
                return Err(bad("the first AR stage takes bytes, not hidden states"))
            }
        };
        let rows = x.size()[1];
        if rows == 0 {
            return Err(bad("an AR step needs at least one position"));
        }
        if cache.positions() + rows > self.info.max_tokens as i64 {
            return Err(bad(format!(
                "sequence would exceed this server's limit of {} positions",
                self.info.max_tokens
            )));
        }
        tch::no_grad(|| {
            let y = net.net.forward_layers_cached(layers.clone(), &x, cache);
            if *head {
                let logits = net
                    .net
                    .head_logits(&y.narrow(1, rows - 1, 1))
                    .view([1, -1])
                    .to_kind(Kind::Float);
                let mut rng = SampleRng::for_ar(seed, output_index);
                let byte = sampler::sample_bytes(&logits, &settings(sampling), &mut rng)[0];
                Ok(ArStepOut::Byte(byte))
            } else {
                let values: Vec<f32> =
                    Vec::try_from(y.to_kind(Kind::Float).to_device(Device::Cpu).view([-1]))
                        .map_err(|e| bad(format!("reading hidden states: {e}")))?;
                Ok(ArStepOut::Hidden(values, rows as u32))
            }
        })
    }
}

fn settings(s: &Sampling) -> SampleSettings {
    SampleSettings {
        steps_per_block: s.steps_per_block as usize,
        temperature: s.temperature,
        top_k: s.top_k as i64,
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
