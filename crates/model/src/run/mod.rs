//! A run directory: `run.json` (the manifest) plus content-addressed weight and
//! optimizer files, one pair per part (a block, or the single E2E / AR network).
//!
//! Crash safety: a part's new files are written under their blake3 name first, the
//! manifest is then atomically replaced, and only then are the old files removed. A
//! kill at any point leaves a manifest that names complete, hash-checked files.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Device;

use crate::checkpoint::{content_hash, read_file, write_atomic};
use crate::config::{ModelConfig, Schedule};
use crate::data::Dataset;
use crate::optim::OptimConfig;
use crate::trainer::{Objective, Trainer};
use crate::{ModelError, Result};

/// Version of the manifest layout this build reads and writes.
pub const FORMAT: u32 = 1;
const MANIFEST: &str = "run.json";

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
}

/// An opened run directory. A writer holds the directory's exclusive lock; readers
/// take none (files are immutable once named in run.json, so a reader sees a complete
/// run, or at worst a clear "file not found" if a writer just replaced it).
#[derive(Debug)]
pub struct RunDir {
    /// Directory path.
    pub path: PathBuf,
    /// Its manifest as last saved.
    pub manifest: Manifest,
    writer_lock: Option<std::fs::File>,
}

/// Takes the directory's exclusive lock: one writer per run, or files could be lost.
fn lock(path: &Path) -> Result<std::fs::File> {
    let file = path.join(".lock");
    let io = |source| ModelError::Io {
        path: file.display().to_string(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&file)
        .map_err(io)?;
    f.try_lock().map_err(|_| {
        ModelError::Config(format!(
            "{} is in use by another blocktrain process",
            path.display()
        ))
    })?;
    Ok(f)
}

impl Manifest {
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

impl RunDir {
    /// Creates a new run; refuses to clobber an existing one.
    pub fn create(path: &Path, manifest: Manifest) -> Result<Self> {
        if path.join(MANIFEST).exists() {
            return Err(ModelError::Config(format!(
                "{} already holds a run; pass --resume to continue it or choose another --out",
                path.display()
            )));
        }
        std::fs::create_dir_all(path).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })?;
        manifest.validate()?;
        let dir = RunDir {
            path: path.to_path_buf(),
            manifest,
            writer_lock: Some(lock(path)?),
        };
        dir.save_manifest()?;
        Ok(dir)
    }

    /// Opens an existing run to continue training it (takes the writer lock).
    pub fn open_writer(path: &Path) -> Result<Self> {
        let mut dir = RunDir::open(path)?;
        dir.writer_lock = Some(lock(path)?);
        Ok(dir)
    }

    /// Opens an existing run for reading, with a clear error when it is missing or unreadable.
    pub fn open(path: &Path) -> Result<Self> {
        let file = path.join(MANIFEST);
        if !file.exists() {
            return Err(ModelError::Config(format!(
                "no checkpoint at {}: {} is missing (train one with `blocktrain train --out {}`)",
                path.display(),
                MANIFEST,
                path.display()
            )));
        }
        let text = read_file(&file)?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| ModelError::Corrupt(format!("{}: {e}", file.display())))?;
        if manifest.format != FORMAT {
            return Err(ModelError::Mismatch(format!(
                "{} has format {}, this build reads format {FORMAT}",
                file.display(),
                manifest.format
            )));
        }
        manifest.validate()?;
        Ok(RunDir {
            path: path.to_path_buf(),
            manifest,
            writer_lock: None,
        })
    }

    fn save_manifest(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.manifest).expect("manifest serialises");
        write_atomic(&self.path.join(MANIFEST), &json)
    }

    fn file(&self, part: usize, kind: &str, hash: &str) -> PathBuf {
        self.path.join(format!(
            "{}.{kind}.{}.safetensors",
            self.manifest.parts[part].name,
            &hash[..16]
        ))
    }

    fn read_checked(&self, part: usize, kind: &str, hash: &str) -> Result<Vec<u8>> {
        let path = self.file(part, kind, hash);
        let bytes = read_file(&path)?;
        if content_hash(&bytes) != hash {
            return Err(ModelError::Corrupt(format!(
                "{}: content does not match its blake3 in run.json",
                path.display()
            )));
        }
        Ok(bytes)
    }

    /// The trainer of `part`: restored from its files when it has been saved, fresh otherwise.
    pub fn trainer(&self, part: usize, device: Device) -> Result<Trainer> {
        let m = &self.manifest;
        let state = m
            .parts
            .get(part)
            .ok_or_else(|| ModelError::Config(format!("run has no part {}", part + 1)))?;
        let seed = (m.plan.seed as i64)
            .wrapping_mul(1000)
            .wrapping_add(part as i64);
        let mut trainer = Trainer::new(
            &m.part_model(part),
            state.objective,
            m.optim.clone(),
            device,
            seed,
        )?;
        if let Some(hash) = &state.weights_hash {
            trainer.load_weights(&self.read_checked(part, "weights", hash)?)?;
        }
        if let Some(hash) = &state.optim_hash {
            trainer.load_optimizer(&self.read_checked(part, "optim", hash)?)?;
        }
        Ok(trainer)
    }

    /// A trained part for evaluation or sampling; an untrained part is an error.
    pub fn trained(&self, part: usize, device: Device) -> Result<Trainer> {
        let state = &self.manifest.parts[part];
        if state.weights_hash.is_none() {
            return Err(ModelError::Config(format!(
                "{} of {} has not been trained yet",
                state.name,
                self.path.display()
            )));
        }
        self.trainer(part, device)
    }

    /// Saves `part`'s weights from serialized bytes (a coordinator's merged version), with
    /// no optimizer state; `steps_done` counts the local steps merged into them. Same
    /// crash-safe order as [`RunDir::save`].
    pub fn save_weights(&mut self, part: usize, weights: &[u8], steps_done: i64) -> Result<()> {
        if self.writer_lock.is_none() {
            return Err(ModelError::Config(
                "run opened read-only; use RunDir::open_writer to save".into(),
            ));
        }
        let (tensors, _) = crate::checkpoint::from_bytes(weights)?;
        crate::checkpoint::check_finite(&tensors)?;
        let wh = content_hash(weights);
        write_atomic(&self.file(part, "weights", &wh), weights)?;
        let s = &mut self.manifest.parts[part];
        let old = (s.weights_hash.replace(wh.clone()), s.optim_hash.take());
        s.steps_done = steps_done;
        self.save_manifest()?;
        if let Some(h) = old.0.filter(|h| *h != wh) {
            let _ = std::fs::remove_file(self.file(part, "weights", &h));
        }
        if let Some(h) = old.1 {
            let _ = std::fs::remove_file(self.file(part, "optim", &h));
        }
        Ok(())
    }

    /// Saves `part`'s weights and optimizer state, then the manifest, then drops old files.
    pub fn save(
        &mut self,
        part: usize,
        trainer: &Trainer,
        last_loss: Option<f64>,
        seconds: f64,
    ) -> Result<()> {
        if self.writer_lock.is_none() {
            return Err(ModelError::Config(
                "run opened read-only; use RunDir::open_writer to save".into(),
            ));
        }
        crate::checkpoint::check_finite(&trainer.weights())?;
        let weights = trainer.weights_bytes()?;
        let optim = trainer.optimizer_bytes()?;
        let (wh, oh) = (content_hash(&weights), content_hash(&optim));
        write_atomic(&self.file(part, "weights", &wh), &weights)?;
        write_atomic(&self.file(part, "optim", &oh), &optim)?;
        let old = {
            let s = &mut self.manifest.parts[part];
            let old = (
                s.weights_hash.replace(wh.clone()),
                s.optim_hash.replace(oh.clone()),
            );
            s.steps_done = trainer.steps();
            s.last_loss = last_loss;
            s.train_seconds += seconds;
            old
        };
        self.save_manifest()?;
        if let Some(h) = old.0.filter(|h| *h != wh) {
            let _ = std::fs::remove_file(self.file(part, "weights", &h));
        }
        if let Some(h) = old.1.filter(|h| *h != oh) {
            let _ = std::fs::remove_file(self.file(part, "optim", &h));
        }
        Ok(())
    }
}
