//! The `run.json` manifest: family, shapes, plan and each part's progress.
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, Schedule};
use crate::data::Dataset;
use crate::optim::OptimConfig;
use crate::trainer::Objective;
use crate::{ModelError, Result};

/// Version of the manifest layout this build reads and writes.
pub const FORMAT: u32 = 1;

/// Which model family a run trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// B block-local diffusion networks, one per interval.
    Block,
    /// One diffusion network trained end-to-end on [0, 1].
    E2e,
    /// One causal next-byte network.
    Ar,
    /// B block-local embedding-diffusion networks, one per sigma interval of equal
    /// lognormal mass (the BlockTrain paper's family).
    Edm,
    /// One embedding-diffusion network trained end-to-end on `[sigma_min, sigma_max]`.
    #[serde(rename = "edm-e2e")]
    EdmE2e,
}

impl Family {
    /// Whether the family is embedding diffusion.
    pub fn is_edm(self) -> bool {
        matches!(self, Family::Edm | Family::EdmE2e)
    }

    /// Whether the family trains one network per block.
    pub fn is_blocks(self) -> bool {
        matches!(self, Family::Block | Family::Edm)
    }

    /// How tables name a run of this family.
    pub fn describe(self) -> &'static str {
        match self {
            Family::Block => "masked diffusion, block-local",
            Family::E2e => "masked diffusion, E2E reference",
            Family::Ar => "AR reference",
            Family::Edm => "embedding diffusion (EDM), block-local",
            Family::EdmE2e => "embedding diffusion (EDM), E2E reference",
        }
    }
}

/// Data and budget of a run (identical across families for a fair comparison).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainPlan {
    /// Optimizer steps per part.
    pub steps: i64,
    /// Windows per batch.
    pub batch: i64,
    /// Seeds data order (same across families) and initial weights.
    pub seed: u64,
    /// Training corpus (its train split only).
    pub dataset: Dataset,
}

/// Progress of one part.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartState {
    /// `block-1`..`block-B`, `e2e` or `ar`.
    pub name: String,
    /// What this part is trained on.
    pub objective: Objective,
    /// Steps completed and saved.
    pub steps_done: i64,
    /// blake3 of the saved weights file (None until first save).
    pub weights_hash: Option<String>,
    /// blake3 of the saved optimizer file.
    pub optim_hash: Option<String>,
    /// Mean training loss over the last logging window.
    pub last_loss: Option<f64>,
    /// Wall-clock seconds spent training this part.
    pub train_seconds: f64,
}

/// The `run.json` manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version ([`FORMAT`]).
    pub format: u32,
    /// Model family.
    pub family: Family,
    /// Shape of each part's network.
    pub model: ModelConfig,
    /// Block intervals (also the partition evaluation reports on, for every family).
    pub schedule: Schedule,
    /// Optimizer and LR schedule.
    pub optim: OptimConfig,
    /// Data and budget.
    pub plan: TrainPlan,
    /// One entry per network.
    pub parts: Vec<PartState>,
    /// Block families only: layers of each block (overrides `model.n_layers` per block),
    /// so capacity can follow where the loss is hard. None: every block has `model.n_layers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_layers: Option<Vec<i64>>,
}

impl Manifest {
    /// A new, untrained run.
    pub fn new(
        family: Family,
        mut model: ModelConfig,
        schedule: Schedule,
        optim: OptimConfig,
        plan: TrainPlan,
    ) -> Result<Self> {
        schedule.validate()?;
        model.causal = family == Family::Ar;
        if model.causal {
            model.t_cond = false;
        }
        if !family.is_edm() {
            model.edm = None;
        }
        model.validate()?;
        let edm = match (&model.edm, family.is_edm()) {
            (Some(edm), true) => Some(edm.clone()),
            (None, true) => {
                return Err(ModelError::Config(
                    "an edm run needs the model's edm settings".into(),
                ))
            }
            _ => None,
        };
        let part = |name: String, objective| PartState {
            name,
            objective,
            steps_done: 0,
            weights_hash: None,
            optim_hash: None,
            last_loss: None,
            train_seconds: 0.0,
        };
        let parts = match family {
            Family::Block => (0..schedule.blocks())
                .map(|i| {
                    let (lo, hi) = schedule.interval(i);
                    part(format!("block-{}", i + 1), Objective::Interval { lo, hi })
                })
                .collect(),
            Family::E2e => vec![part("e2e".into(), Objective::Interval { lo: 0.0, hi: 1.0 })],
            Family::Ar => vec![part("ar".into(), Objective::Autoregressive)],
            Family::Edm => {
                let edm = edm.as_ref().expect("checked above");
                (0..schedule.blocks())
                    .map(|i| {
                        let (u_lo, u_hi) = schedule.interval(i);
                        let objective = Objective::Edm {
                            lo: edm.sigma_at(u_lo),
                            hi: edm.sigma_at(u_hi),
                        };
                        part(format!("block-{}", i + 1), objective)
                    })
                    .collect()
            }
            Family::EdmE2e => {
                let edm = edm.as_ref().expect("checked above");
                let objective = Objective::Edm {
                    lo: edm.sigma_min,
                    hi: edm.sigma_max,
                };
                vec![part("e2e".into(), objective)]
            }
        };
        Ok(Manifest {
            format: FORMAT,
            family,
            model,
            schedule,
            optim,
            plan,
            parts,
            block_layers: None,
        })
    }

    /// The shape of `part`'s network.
    pub fn part_model(&self, part: usize) -> ModelConfig {
        let mut cfg = self.model.clone();
        if let Some(layers) = self.block_layers.as_ref().and_then(|l| l.get(part)) {
            cfg.n_layers = *layers;
        }
        cfg
    }

    /// Gives each block its own layer count (block family, one positive count per block).
    pub fn with_block_layers(mut self, layers: Vec<i64>) -> Result<Self> {
        if !self.family.is_blocks()
            || layers.len() != self.parts.len()
            || layers.iter().any(|&l| l < 1)
        {
            return Err(ModelError::Config(format!(
                "per-block layers need the block objective and {} positive counts, got {layers:?}",
                self.parts.len()
            )));
        }
        self.block_layers = Some(layers);
        Ok(self)
    }

    /// The part whose network covers report interval `idx` (diffusion families).
    pub fn part_for_interval(&self, idx: usize) -> usize {
        if self.family.is_blocks() {
            idx
        } else {
            0
        }
    }

    /// Checks that parts, names, objectives and hashes are what this family and
    /// schedule imply (a hand-edited or foreign run.json must not index out of range,
    /// score the wrong interval, or name files outside the directory).
    pub fn validate(&self) -> Result<()> {
        let expected = Manifest::new(
            self.family,
            self.model.clone(),
            self.schedule.clone(),
            self.optim.clone(),
            self.plan.clone(),
        )?;
        let expected = match &self.block_layers {
            Some(layers) => expected.with_block_layers(layers.clone())?,
            None => expected,
        };
        let same = |a: &PartState, b: &PartState| {
            a.name == b.name && same_objective(a.objective, b.objective)
        };
        if self.parts.len() != expected.parts.len()
            || !self
                .parts
                .iter()
                .zip(&expected.parts)
                .all(|(a, b)| same(a, b))
            || self.model != expected.model
        {
            return Err(ModelError::Corrupt(
                "run.json parts or model do not match its family and schedule".into(),
            ));
        }
        let hash_ok = |h: &Option<String>| {
            h.as_ref()
                .is_none_or(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        };
        if !self
            .parts
            .iter()
            .all(|p| hash_ok(&p.weights_hash) && hash_ok(&p.optim_hash) && p.steps_done >= 0)
        {
            return Err(ModelError::Corrupt(
                "run.json holds a malformed hash or step count".into(),
            ));
        }
        if self.plan.steps <= 0 || self.plan.batch <= 0 {
            return Err(ModelError::Corrupt(
                "run.json plan needs positive steps and batch".into(),
            ));
        }
        Ok(())
    }
}

/// Objectives agree up to float rounding: sigma bounds are recomputed from the schedule
/// through `exp` and `ln`, whose last bit may differ between platforms' maths libraries.
fn same_objective(a: Objective, b: Objective) -> bool {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0);
    match (a, b) {
        (Objective::Interval { lo, hi }, Objective::Interval { lo: l2, hi: h2 })
        | (Objective::Edm { lo, hi }, Objective::Edm { lo: l2, hi: h2 }) => {
            close(lo, l2) && close(hi, h2)
        }
        (Objective::Autoregressive, Objective::Autoregressive) => true,
        _ => false,
    }
}
