//! One network with its own `VarStore` and optimizer: the unit a worker trains.
//!
//! A block's trainer owns only that block's parameters and moments, so no gradient or
//! optimizer state can reach another block: isolation by construction.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::checkpoint::{self, NamedTensors};
use crate::config::ModelConfig;
use crate::objective::{ar, edm, masked};
use crate::optim::{AdamW, OptimConfig};
use crate::transformer::Denoiser;
use crate::{ModelError, Result};

/// What a network is trained on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Objective {
    /// Masked diffusion on the masking-rate interval `[lo, hi]` (a block; E2E is `[0, 1]`).
    Interval {
        /// Lower bound t(b-1).
        lo: f64,
        /// Upper bound t(b).
        hi: f64,
    },
    /// Next-byte prediction with causal attention (the AR reference).
    Autoregressive,
    /// Embedding diffusion on the sigma interval `[lo, hi]` (a block of the paper's
    /// family; its E2E reference is `[sigma_min, sigma_max]`): EDM-weighted CE.
    Edm {
        /// Lowest noise level of the interval.
        lo: f64,
        /// Highest.
        hi: f64,
    },
}

/// A network, its variables and its optimizer state.
#[derive(Debug)]
pub struct Trainer {
    /// This network's variables only.
    pub vs: nn::VarStore,
    /// The network.
    pub net: Denoiser,
    /// Its AdamW state, parameters in sorted-name order.
    pub opt: AdamW,
    /// What it is trained on.
    pub objective: Objective,
    /// Optimizer and schedule.
    pub optim: OptimConfig,
    names: Vec<String>,
    seed: i64,
}

impl Trainer {
    /// A freshly initialised network; `seed` fixes the initial weights.
    pub fn new(
        cfg: &ModelConfig,
        objective: Objective,
        optim: OptimConfig,
        device: Device,
        seed: i64,
    ) -> Result<Self> {
        cfg.validate()?;
        if matches!(objective, Objective::Autoregressive) != cfg.causal {
            return Err(ModelError::Config(
                "causal attention goes with the autoregressive objective only".into(),
            ));
        }
        if matches!(objective, Objective::Edm { .. }) != cfg.edm.is_some() {
            return Err(ModelError::Config(
                "an edm network shape goes with the edm objective only".into(),
            ));
        }
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(device);
        let net = Denoiser::new(&vs.root(), cfg);
        let named: NamedTensors = vs.variables().into_iter().collect();
        let names: Vec<String> = named.keys().cloned().collect();
        let opt = AdamW::new(named.into_values().collect(), optim.clone());
        Ok(Trainer {
            vs,
            net,
            opt,
            objective,
            optim,
            names,
            seed,
        })
    }

    /// Loss of one batch `x` (N, T) under this network's objective (a scalar tensor).
    pub fn loss(&self, x: &Tensor) -> Tensor {
        match self.objective {
            Objective::Interval { lo, hi } => masked::interval_loss(&self.net, x, lo, hi),
            Objective::Autoregressive => ar::ar_nll(&self.net, x).mean(Kind::Float),
            Objective::Edm { lo, hi } => edm::interval_loss(&self.net, x, lo, hi),
        }
    }

    /// One optimizer step on `x`; the LR follows the schedule over `total_steps`.
    /// Returns the (detached) loss without a host sync. The masking noise of step s is
    /// seeded from (seed, s) alone, so a resumed or re-run step draws the same masks.
    pub fn train_step(&mut self, x: &Tensor, total_steps: i64) -> Tensor {
        let noise_seed = self
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(self.opt.steps);
        let lr = self.optim.lr_at(self.opt.steps, total_steps);
        self.train_step_with(x, lr, noise_seed)
    }

    /// One optimizer step at an explicit `lr`, with masks drawn from `noise_seed`: for a
    /// worker whose position in the block's schedule is set by the coordinator, not by
    /// its own step count.
    pub fn train_step_with(&mut self, x: &Tensor, lr: f64, noise_seed: i64) -> Tensor {
        tch::manual_seed(noise_seed);
        self.opt.zero_grad();
        let loss = self.loss(x);
        loss.backward();
        let _grad_norm = self.opt.clip_grad_norm();
        self.opt.step(lr);
        loss.detach()
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> i64 {
        self.opt.steps
    }

    /// Number of parameters.
    pub fn param_count(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    /// The weights by name (shallow clones of the live variables).
    pub fn weights(&self) -> NamedTensors {
        self.vs.variables().into_iter().collect()
    }

    /// Serialised weights (safetensors).
    pub fn weights_bytes(&self) -> Result<Vec<u8>> {
        checkpoint::to_bytes(&self.weights(), &BTreeMap::new())
    }

    /// The optimizer moments by checkpoint name: `exp_avg/NAME`, `exp_avg_sq/NAME`
    /// (shallow clones of the live buffers).
    pub fn moments(&self) -> NamedTensors {
        let mut t = NamedTensors::new();
        for (i, name) in self.names.iter().enumerate() {
            t.insert(
                format!("exp_avg/{name}"),
                self.opt.exp_avg[i].shallow_clone(),
            );
            t.insert(
                format!("exp_avg_sq/{name}"),
                self.opt.exp_avg_sq[i].shallow_clone(),
            );
        }
        t
    }

    /// Serialised optimizer state: the moments plus the step count.
    pub fn optimizer_bytes(&self) -> Result<Vec<u8>> {
        let meta = BTreeMap::from([("steps".to_string(), self.opt.steps.to_string())]);
        checkpoint::to_bytes(&self.moments(), &meta)
    }

    /// Loads weights strictly; on error the live weights are unchanged.
    pub fn load_weights(&mut self, bytes: &[u8]) -> Result<()> {
        let (incoming, _) = checkpoint::from_bytes(bytes)?;
        checkpoint::load_strict(&self.weights(), &incoming)
    }

    /// Loads moments (safetensors named as [`Trainer::moments`]) strictly and sets the
    /// step count bias correction uses; on error the live state is unchanged.
    pub fn load_moments(&mut self, bytes: &[u8], steps: i64) -> Result<()> {
        if steps < 0 {
            return Err(ModelError::Config(format!(
                "negative optimizer step count {steps}"
            )));
        }
        let (incoming, _) = checkpoint::from_bytes(bytes)?;
        checkpoint::load_strict(&self.moments(), &incoming)?;
        self.opt.steps = steps;
        Ok(())
    }

    /// Loads optimizer moments and the step count strictly.
    pub fn load_optimizer(&mut self, bytes: &[u8]) -> Result<()> {
        let (incoming, meta) = checkpoint::from_bytes(bytes)?;
        let steps: i64 = meta
            .get("steps")
            .and_then(|s| s.parse().ok())
            .filter(|&s: &i64| s >= 0)
            .ok_or_else(|| ModelError::Corrupt("optimizer state has no valid step count".into()))?;
        checkpoint::load_strict(&self.moments(), &incoming)?;
        self.opt.steps = steps;
        Ok(())
    }
}
