//! A run directory: `run.json` (the manifest) plus content-addressed weight and
//! optimizer files, one pair per part (a block, or the single E2E / AR network).
//!
//! Crash safety: a part's new files are written under their blake3 name first, the
//! manifest is then atomically replaced, and only then are the old files removed. A
//! kill at any point leaves a manifest that names complete, hash-checked files.
//!
//! Files: `manifest` ([`Manifest`] and what it holds, and its checks), `dir` ([`RunDir`]:
//! the lock, reading and saving).
mod dir;
mod manifest;

pub use dir::RunDir;
pub use manifest::{Family, Manifest, PartState, TrainPlan, FORMAT};
