//! Loading a stage: from a run directory written by training, or random weights of a
//! logical shape; either way the model id a route must agree on.
use std::path::Path;

use blocktrain_model::config::Schedule;
use blocktrain_model::logical::LogicalShape;
use blocktrain_model::run::{Family, RunDir};
use blocktrain_protocol::frame::{BlockRange, ServerInfo};
use tch::Device;

use super::{bad, check_range, model_id, Hosted, Net, Role};
use crate::ServeError;

impl Hosted {
    pub(super) fn from_run(
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
                busy_ms: 0.0,
                batches: 0,
                batched: 0,
            },
            role,
            device,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn logical(
        shape: &LogicalShape,
        ar: bool,
        total: u32,
        seed: i64,
        block_layers: Option<&[u32]>,
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
        let mut id_src = format!("logical:{shape}:{ar}:{total}:{seed}");
        if let Some(per) = block_layers {
            check_block_layers(per, ar, total)?;
            id_src += &format!(":{per:?}");
        }
        let id = model_id(&id_src);
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
                let mut block = shape.clone();
                if let Some(per) = block_layers {
                    block.n_layers = per[b as usize - 1] as i64; // checked: total entries
                }
                let (vs, net) = block.build(device, seed + b as i64, false);
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
                busy_ms: 0.0,
                batches: 0,
                batched: 0,
            },
            role,
            device,
        })
    }
}

/// Most layer applications one block of a logical model may have.
const MAX_BLOCK_LAYERS: u32 = 1 << 16;

fn check_block_layers(per: &[u32], ar: bool, total: u32) -> Result<(), ServeError> {
    if ar {
        return Err(bad(
            "--block-layers splits diffusion blocks; an AR stage's layers are its --blocks",
        ));
    }
    if per.len() != total as usize {
        return Err(bad(format!(
            "--block-layers lists {} blocks, the model has --total {total}",
            per.len()
        )));
    }
    if let Some(n) = per.iter().find(|n| !(1..=MAX_BLOCK_LAYERS).contains(*n)) {
        return Err(bad(format!(
            "--block-layers: {n} layers in a block (use 1..={MAX_BLOCK_LAYERS})"
        )));
    }
    Ok(())
}
