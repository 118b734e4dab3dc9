//! What a coordinator tells a registering worker. A wire body, but it carries the
//! model's [`Manifest`], so it lives here rather than in `blocktrain_protocol` (which
//! knows no model types); its own module so the worker need not import the coordinator.
use blocktrain_model::run::Manifest;
use serde::{Deserialize, Serialize};

/// What a worker needs to build a block's network (`GET /v1/run`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunInfo {
    /// The run's manifest (model shape, schedule, inner optimizer).
    pub manifest: Manifest,
    /// Update codec.
    pub codec: String,
    /// `[training] max_staleness`: how many versions old an accepted update may be (the
    /// worker's ledger audit reads it to know which round an upload joined; 0 from
    /// coordinators that predate it).
    #[serde(default)]
    pub max_staleness: u64,
}
