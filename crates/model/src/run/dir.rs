//! An opened run directory: its lock, and reading and saving parts' files.
use std::path::{Path, PathBuf};

use tch::Device;

use super::{Manifest, FORMAT};
use crate::checkpoint::{content_hash, read_file, write_atomic};
use crate::trainer::Trainer;
use crate::{ModelError, Result};

const MANIFEST: &str = "run.json";

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
