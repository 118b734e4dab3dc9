//! The coordinator's state machine: who trains which block from which version, when a
//! round closes, and how its updates become the next version.
//!
//! Every method takes the time explicitly, so the rules below are unit-tested without
//! sleeping. The HTTP layer ([`crate::server`]) only authenticates and forwards.
//!
//! The decisions themselves (assignment, lapses, slots and seeds, one decided upload
//! per lease, round readiness, stalls) are the pure state machine in [`crate::core`];
//! this is its shell. It rebuilds the core from SQLite at start-up, journals every hard
//! transition before its reply, writes the core's soft state at every tick, and does the
//! compute the decisions call for: vetting (off the lock, [`VetJob`]), merging and the
//! outer step, receipts.
//!
//! ## Rules the shell adds
//! - **Round close**: a ready round's updates are averaged (weighted by steps, a stale
//!   one's weight scaled by s(k), [`crate::merge`]) and the outer optimizer produces
//!   v+1; open leases more than `max_staleness` versions behind v+1 are superseded, and
//!   their heartbeats tell the workers to stop.
//! - **Stale rule** (`[training] max_staleness` K, default 0): an update computed from
//!   version v-k, k <= K, is accepted into the block's current round v and merged
//!   there (its receipt records k); one more than K versions old is rejected as stale
//!   (recorded), and the worker fetches the new version. With K = 0 an update is merged
//!   only into the version it was computed from. A late update whose lease lapsed but
//!   whose version is still within K is accepted: nothing merged is older than its
//!   base. A stale update is vetted as any: its spot check recomputes it from its own
//!   version's file (kept: `keep_versions` > K), and the held-out screen applies s(k)
//!   of its delta to the current weights, as a merge of it alone would.
//! - **Validation** (each rejection recorded with its reason, stored checkpoints
//!   untouched): lease must exist and belong to the signer; body within the size limit;
//!   exactly the block's tensor names, shapes and dtypes; every value finite; the RMS of
//!   every tensor of the delta at most `max_delta_ratio` x lr x steps (AdamW moves a
//!   weight about lr per step). Re-sending an accepted update (a lost reply) returns
//!   the first reply; an update is never counted twice.
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use blocktrain_model::checkpoint::content_hash;
use blocktrain_model::run::{Manifest, RunDir};
use blocktrain_protocol::codec::{self, Arrays, Codec, Shapes};
use blocktrain_protocol::wire::{Lease, RegisterRequest, UpdateReply, WorkReply, WorkerInfo};
use serde::{Deserialize, Serialize};

use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::receipt::{Claim, Decision, Receipt};

use crate::config::RunConfig;
use crate::core::{Core, LeaseRow};
use crate::ledger::Ledger;
use crate::merge;
use crate::store::{update_state, BlockHead, NewUpdate, Store, Traffic, UpdateRecord};
use crate::tensors;
use crate::trust;
use crate::{NodeError, Result};

pub use crate::run_info::RunInfo;

mod open;
mod receipts;
mod round;
mod rules;
mod status;
mod submit;
mod vet;

pub use round::{MergeJob, Merged};
pub use vet::{Admitted, VetJob, Vetted};
mod work;

/// One block in `/v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlockStatus {
    /// Index.
    pub block: usize,
    /// Committed version.
    pub version: u64,
    /// Versions the run will produce.
    pub rounds: u64,
    /// Leases out now.
    pub active_leases: u32,
    /// Updates waiting for the round to close.
    pub pending_updates: usize,
    /// Local steps merged so far.
    pub steps: i64,
    /// blake3 of the current weights.
    pub weights: String,
    /// Bytes workers uploaded for this block.
    pub bytes_up: u64,
    /// Bytes workers downloaded for this block.
    pub bytes_down: u64,
    /// Held-out loss of the current version on the coordinator's screen (nats/byte;
    /// None with screening off).
    #[serde(default)]
    pub heldout: Option<f64>,
    /// Unfinished, and nothing accepted or committed for [`Coordinator::stall_ms`]:
    /// nobody is advancing it (no workers, or every update refused).
    #[serde(default)]
    pub stalled: bool,
}

/// One worker in `/v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Public key.
    pub key: String,
    /// Device it reported.
    pub device: String,
    /// Measured steps/s.
    pub step_rate: Option<f64>,
    /// blake3 of its own data, if it brought any.
    pub data_blake3: Option<String>,
    /// Size of its own data.
    pub data_bytes: Option<i64>,
    /// Last contact.
    pub last_seen_ms: u64,
    /// Bytes it uploaded.
    pub bytes_up: u64,
    /// Bytes it downloaded.
    pub bytes_down: u64,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// Every block has all its versions.
    pub done: bool,
    /// Blocks.
    pub blocks: Vec<BlockStatus>,
    /// Workers.
    pub workers: Vec<WorkerStatus>,
    /// Updates by state (pending / applied / rejected).
    pub updates: HashMap<String, u64>,
    /// Of the applied updates, those merged stale (computed from an older version).
    #[serde(default)]
    pub stale_applied: u64,
    /// The most recent updates, newest first (rejections carry their reason).
    pub recent: Vec<UpdateRecord>,
    /// Total bytes uploaded by workers.
    pub bytes_up: u64,
    /// Total bytes downloaded by workers.
    pub bytes_down: u64,
    /// Workers whose updates failed a spot check.
    #[serde(default)]
    pub flagged: Vec<FlaggedWorker>,
}

/// A worker whose updates failed spot checks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlaggedWorker {
    /// Public key.
    pub key: String,
    /// Failed checks so far.
    pub failed_checks: i64,
    /// The last one's reason.
    pub last_reason: String,
}

/// The coordinator of one run.
pub struct Coordinator {
    store: Store,
    /// The transparency log of receipts (its tables live in the store's database).
    ledger: Ledger,
    /// Signs receipts and tree heads; its public key identifies this coordinator.
    identity: Identity,
    cfg: RunConfig,
    /// Per block, the fixed held-out draws updates are screened on (empty: screening off).
    /// Each has its own lock: vetting runs without the coordinator's.
    screens: Vec<Arc<Mutex<crate::verify::Screen>>>,
    /// Per block, the held-out loss of its current version (with screening on).
    heldout: Vec<f64>,
    /// Per block, the held-out change of recently accepted updates (the screen's
    /// calibration, [`Coordinator::screen_threshold`]).
    screen_changes: Vec<VecDeque<f64>>,
    /// The training corpus, loaded on the first spot check.
    corpus: Option<Arc<Vec<u8>>>,
    shapes: Vec<Shapes>,
    /// Per block, the current version's weights (shared with vetting jobs).
    current: Vec<Arc<Arrays>>,
    /// Whether commits skip their fsync (a group commit flushes them; see `defer_sync`).
    deferred_sync: bool,
    /// Files to delete once the commits that stopped naming them are flushed: (staged
    /// at the last tick, queued since). The server's ticker flushes after every tick,
    /// so what was queued before one tick is deleted at the next.
    doomed: (Vec<PathBuf>, Vec<PathBuf>),
    /// The decisions' state ([`crate::core`]), shared with the server, which answers
    /// what writes nothing (heartbeats, work requests told to wait) from it without
    /// this coordinator's lock. Lock order: the coordinator, then the core.
    core: Arc<Mutex<Core>>,
    /// When stalls were last checked (at most once a second).
    stalls_checked: u64,
    model: RunDir,
    state_dir: PathBuf,
}

impl Drop for Coordinator {
    /// A stopped coordinator leaves the journal with its last soft state (renewals,
    /// lapses, last contact): only a crash loses a tick of it.
    fn drop(&mut self) {
        if let Err(e) = self.flush_soft() {
            tracing::warn!("soft state not written at stop: {e}");
        }
    }
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Coordinator({})", self.state_dir.display())
    }
}

/// What vetting an update found out (recorded with it, and in its receipt).
#[derive(Debug)]
struct Verdict {
    /// Held-out loss of the block before and after applying the update alone.
    heldout: Option<(f64, f64)>,
}

/// Most bytes a block's update may take: 6 per value (the costliest codec, top-k at
/// fraction 1: u32 index + f16 value) plus header room.
fn update_limit(shapes: &Shapes) -> u64 {
    let values: usize = shapes.values().map(|s| s.iter().product::<usize>()).sum();
    (values as u64) * 6 + (shapes.len() as u64) * 256 + 64 * 1024
}

impl Coordinator {
    /// The tensors an update of `block` holds: its weights' deltas, and the moments'
    /// deltas when the run carries optimizer state ([`crate::moments`]).
    fn update_shapes(&self, block: usize) -> Shapes {
        let weights = &self.shapes[block];
        match self.cfg.training.optimizer_state {
            crate::config::OptimizerState::Carry => {
                let mut all = weights.clone();
                all.extend(crate::moments::shapes_of(weights));
                all
            }
            crate::config::OptimizerState::Fresh => weights.clone(),
        }
    }
}

fn encode_weights(weights: &Arrays) -> Vec<u8> {
    codec::encode(weights, Codec::Fp32)
}

/// The copy workers download, in the run's checkpoint codec.
fn encode_wire(weights: &Arrays, cfg: &RunConfig) -> Vec<u8> {
    match cfg.wire.checkpoint_codec.as_str() {
        "fp16" => codec::encode(weights, Codec::Fp16),
        "int8" => codec::encode(weights, Codec::Int8 { chunk: 256 }),
        _ => encode_weights(weights),
    }
}

impl Coordinator {
    /// Hands durability to a group commit: commits stop waiting for the disk, and an
    /// fsync of the returned WAL file makes every earlier one durable
    /// ([`crate::server`] does so before it replies).
    pub fn defer_sync(&mut self) -> Result<PathBuf> {
        self.deferred_sync = true;
        self.store.defer_sync(&self.state_dir)
    }

    /// A second, read-only connection to the database (public reads use it, so they
    /// never wait for the coordinator's lock).
    pub fn open_reader(&self) -> Result<rusqlite::Connection> {
        crate::ledger::open_read_only(&self.state_dir)
    }

    /// The run's settings.
    pub fn config(&self) -> &RunConfig {
        &self.cfg
    }

    /// The exported model directory (`blocktrain eval --checkpoint` reads it).
    pub fn model_dir(&self) -> PathBuf {
        self.state_dir.join("model")
    }

    /// What workers need to build the blocks.
    pub fn run_info(&self) -> RunInfo {
        RunInfo {
            manifest: self.model.manifest.clone(),
            codec: self.cfg.wire.codec.clone(),
            max_staleness: self.cfg.training.max_staleness,
        }
    }

    /// Largest update body any block accepts (the HTTP body limit).
    pub fn max_update_bytes(&self) -> u64 {
        (0..self.shapes.len())
            .map(|b| update_limit(&self.update_shapes(b)))
            .max()
            .unwrap_or(0)
    }

    /// The decisions' state, shared (the server's fast path reads and renews from it).
    pub fn core(&self) -> Arc<Mutex<Core>> {
        self.core.clone()
    }

    /// Whether `key` is registered and holds lease `lease` (any state).
    pub fn lease_owner(&self, key: &str, lease: i64) -> Result<bool> {
        Ok(self.is_registered(key)? && self.owned_lease(key, lease).is_ok())
    }

    /// Lease `id` of any round: the core's copy while its round is open, else the
    /// journal's.
    pub(super) fn find_lease(&self, id: i64) -> Result<Option<LeaseRow>> {
        match lock(&self.core).lease(id).cloned() {
            Some(l) => Ok(Some(l)),
            None => self.store.lease(id),
        }
    }

    /// Lease `id`, if it exists and belongs to `key`.
    pub(super) fn owned_lease(&self, key: &str, id: i64) -> Result<LeaseRow> {
        let lease = self
            .find_lease(id)?
            .ok_or_else(|| NodeError::NotFound(format!("lease {id}")))?;
        if lease.worker != key {
            return Err(NodeError::Forbidden(format!(
                "lease {id} belongs to another worker"
            )));
        }
        Ok(lease)
    }

    /// Whether `key` has registered.
    pub fn is_registered(&self, key: &str) -> Result<bool> {
        Ok(lock(&self.core).worker(key).is_some())
    }

    pub(super) fn require_registered(&self, key: &str) -> Result<()> {
        match self.is_registered(key)? {
            true => Ok(()),
            false => Err(NodeError::Unauthenticated(format!(
                "unknown worker {}: register first (POST /v1/register)",
                short(key)
            ))),
        }
    }

    /// Writes the core's soft state (renewals, lapses, last contact) to the journal.
    pub(super) fn flush_soft(&mut self) -> Result<()> {
        let soft = lock(&self.core).take_soft();
        if let Err(e) = self.store.write_soft(&soft) {
            lock(&self.core).restore_soft(soft);
            return Err(e);
        }
        Ok(())
    }

    /// The ledger (receipts, tree heads, proofs).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The database connection, for ledger reads.
    pub fn conn(&self) -> &rusqlite::Connection {
        self.store.conn()
    }

    /// This coordinator's public key (receipts and tree heads are signed with it).
    pub fn public_key(&self) -> String {
        self.identity.public_hex()
    }
}

pub use crate::short;

/// The core, locked (a panic while it was held leaves it as it was: every transition
/// checks before it changes anything).
pub(crate) fn lock(core: &Mutex<Core>) -> std::sync::MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use crate::short;

    #[test]
    fn short_cuts_any_text_at_a_character() {
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short("aaaaaaaaaaaé"), "aaaaaaaaaaaé");
        assert_eq!(short("ééééééééééééé"), "éééééééééééé");
    }
}
