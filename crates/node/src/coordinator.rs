//! The coordinator's state machine: who trains which block from which version, when a
//! round closes, and how its updates become the next version.
//!
//! Every method takes the time explicitly, so the rules below are unit-tested without
//! sleeping. The HTTP layer ([`crate::server`]) only authenticates and forwards.
//!
//! ## Rules
//! - **Assignment**: a worker gets the unfinished block with the fewest workers in its
//!   current round (active leases + delivered updates), preferring the block it had
//!   last (its checkpoint is cached), then the block furthest behind. A block takes at
//!   most `workers_per_block` per round; when all are full the worker is told to wait.
//!   A block whose estimated training memory exceeds what the worker reports free is
//!   never assigned to it; a worker too small for every block is refused, saying so.
//! - **Local steps**: H, or with `round_seconds` set and a measured step rate,
//!   rate x round_seconds clamped to [H/4, 4H].
//! - **Leases** lapse `lease_secs` after the last heartbeat (or `max_lease_secs` after
//!   issue); a lapsed lease frees its slot and shard, so the block is re-leased to the
//!   next worker that asks. A restarted coordinator gives open leases a fresh
//!   `lease_secs`, so its downtime is not charged to the workers.
//! - **Round close**: a round (block b at version v) closes when its quorum of accepted
//!   updates is in (`min_updates`, default `workers_per_block`), or `round_timeout_secs`
//!   after its first update with whatever has arrived. Its updates are averaged
//!   (weighted by steps) and the outer optimizer produces v+1; open leases of v are
//!   superseded, and their heartbeats tell the workers to stop.
//! - **Stale rule**: an update is merged only into the version it was computed from.
//!   One for a version the block has left is rejected as stale (recorded), and the
//!   worker fetches the new version. A late update whose lease lapsed but whose round
//!   is still open is accepted: nothing merged is older than its base.
//! - **Validation** (each rejection recorded with its reason, stored checkpoints
//!   untouched): lease must exist and belong to the signer; body within the size limit;
//!   exactly the block's tensor names, shapes and dtypes; every value finite; the RMS of
//!   every tensor of the delta at most `max_delta_ratio` x lr x steps (AdamW moves a
//!   weight about lr per step). Re-sending an accepted update (a lost reply) returns
//!   the first reply; an update is never counted twice.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blocktrain_model::checkpoint::content_hash;
use blocktrain_model::run::{Manifest, RunDir};
use blocktrain_protocol::codec::{self, Arrays, Codec, Shapes};
use blocktrain_protocol::wire::{
    join_proof, Lease, RegisterRequest, UpdateReply, WorkReply, WorkerInfo, WIRE_VERSION,
};
use serde::{Deserialize, Serialize};

use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::receipt::{Claim, Decision, Receipt};

use crate::config::RunConfig;
use crate::ledger::Ledger;
use crate::merge;
use crate::store::{lease_state, update_state, BlockHead, NewUpdate, Store, Traffic, UpdateRecord};
use crate::tensors;
use crate::trust;
use crate::{NodeError, Result};

/// What a worker needs to build a block's network (`GET /v1/run`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunInfo {
    /// The run's manifest (model shape, schedule, inner optimizer).
    pub manifest: Manifest,
    /// Update codec.
    pub codec: String,
}

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
    screens: Vec<crate::verify::Screen>,
    /// Per block, the held-out loss of its current version (with screening on).
    heldout: Vec<f64>,
    /// The training corpus, loaded on the first spot check.
    corpus: Option<Vec<u8>>,
    shapes: Vec<Shapes>,
    current: Vec<Arrays>,
    model: RunDir,
    state_dir: PathBuf,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Coordinator({})", self.state_dir.display())
    }
}

/// What vetting an update found out (recorded with it, and in its receipt).
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

fn seed_of(run_seed: u64, block: usize, version: u64, slot: u32) -> u64 {
    let h = blake3::hash(format!("{run_seed}/{block}/{version}/{slot}").as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
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
    /// Opens the run in `state_dir`, creating it from `cfg` when the directory is new.
    /// A directory that already holds a run resumes it; `cfg`, if given, must match.
    pub fn open(state_dir: &Path, cfg: Option<RunConfig>, now: u64) -> Result<Self> {
        std::fs::create_dir_all(state_dir).map_err(crate::io_err(state_dir))?;
        let mut store = Store::open(state_dir)?;
        let cfg = match (store.meta("config")?, cfg) {
            (Some(stored), given) => {
                let stored = RunConfig::from_toml(&stored)?;
                if let Some(given) = given {
                    if given != stored {
                        return Err(NodeError::Config(format!(
                            "{} already holds a run with other settings; use a new --state \
                             directory, or omit --run to resume it",
                            state_dir.display()
                        )));
                    }
                }
                stored
            }
            (None, Some(given)) => {
                given.validate()?;
                store.set_meta("config", &given.to_toml())?;
                given
            }
            (None, None) => {
                return Err(NodeError::Config(format!(
                    "{} holds no run yet: pass --run run.toml to start one",
                    state_dir.display()
                )))
            }
        };
        let model_dir = state_dir.join("model");
        let mut model = if model_dir.join("run.json").exists() {
            RunDir::open_writer(&model_dir)?
        } else {
            RunDir::create(&model_dir, cfg.manifest()?)?
        };
        // Version 0 of every block (also those a kill during first start left out).
        let present = store.heads()?.len();
        {
            for block in present..cfg.blocks {
                let trainer = model.trainer(block, tch::Device::Cpu)?;
                let weights = tensors::to_arrays(&trainer.weights())?;
                let bytes = encode_weights(&weights);
                let head = BlockHead {
                    block,
                    version: 0,
                    weights: store.put_blob(&bytes)?,
                    wire: store.put_blob(&encode_wire(&weights, &cfg))?,
                    momentum: None,
                    steps: 0,
                };
                store.commit_version(&head, &[], now)?;
                model.save_weights(block, &bytes, 0)?;
            }
        }
        store.extend_active_leases(now + (cfg.faults.lease_secs * 1000.0) as u64)?;
        let removed = store.collect_garbage()?;
        if removed > 0 {
            tracing::info!("removed {removed} unreferenced blobs (left by an interrupted write)");
        }
        let mut shapes = Vec::new();
        let mut current = Vec::new();
        for head in store.heads()? {
            let bytes = store.get_blob(&head.weights)?;
            let s = codec::header_shapes(&bytes).map_err(|e| NodeError::Config(e.to_string()))?;
            let (w, _) = codec::decode(&bytes, &s, usize::MAX)
                .map_err(|e| NodeError::Config(e.to_string()))?;
            // The exported model directory follows the database (it may lag after a crash).
            if model.manifest.parts[head.block].weights_hash.as_deref()
                != Some(&blocktrain_model::checkpoint::content_hash(&bytes))
            {
                model.save_weights(head.block, &bytes, head.steps)?;
            }
            shapes.push(s);
            current.push(w);
        }
        let identity = crate::worker::load_or_create_key(&state_dir.join("coordinator.key"))?;
        let ledger = Ledger::open(store.conn(), identity.clone())?;
        // Held-out screens (fixed windows and masks) and each current version's loss. The
        // draws are seeded from the coordinator's secret, not the run's public seed, so a
        // worker cannot tune an update against them.
        let (mut screens, mut heldout) = (Vec::new(), Vec::new());
        if cfg.trust.screen_windows > 0 {
            let key = blake3::derive_key("blocktrain held-out screen", &identity.secret());
            let seed = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
            for (b, head) in store.heads()?.iter().enumerate() {
                let screen = crate::verify::Screen::new(
                    &model.manifest,
                    b,
                    cfg.trust.screen_windows,
                    seed,
                    tch::Device::Cpu,
                )?;
                // Recomputed at every start (one forward pass per block), so the loss an
                // update is compared with always comes from these very draws.
                let loss = screen.loss(&current[b])?;
                store.put_version_loss(b, head.version, loss, now)?;
                screens.push(screen);
                heldout.push(loss);
            }
        }
        let mut c = Coordinator {
            store,
            ledger,
            identity,
            cfg,
            screens,
            heldout,
            corpus: None,
            shapes,
            current,
            model,
            state_dir: state_dir.to_path_buf(),
        };
        let issued = c.issue_missing_receipts(now)?;
        if issued > 0 {
            tracing::warn!("issued {issued} receipt(s) an interrupted run left out");
        }
        Ok(c)
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
        }
    }

    /// Largest update body any block accepts (the HTTP body limit).
    pub fn max_update_bytes(&self) -> u64 {
        self.shapes.iter().map(update_limit).max().unwrap_or(0)
    }

    /// Whether `key` is registered and holds lease `lease` (any state).
    pub fn lease_owner(&self, key: &str, lease: i64) -> Result<bool> {
        Ok(self.store.worker(key)?.is_some() && self.owned_lease(key, lease).is_ok())
    }

    /// Lease `id`, if it exists and belongs to `key`.
    fn owned_lease(&self, key: &str, id: i64) -> Result<crate::store::LeaseRow> {
        let lease = self
            .store
            .lease(id)?
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
        Ok(self.store.worker(key)?.is_some())
    }

    fn require_registered(&self, key: &str) -> Result<(Option<f64>, Option<usize>)> {
        self.store.worker(key)?.ok_or_else(|| {
            NodeError::Unauthenticated(format!(
                "unknown worker {}: register first (POST /v1/register)",
                short(key)
            ))
        })
    }

    /// Admits a worker (join secret / allowlist) and records what it reported.
    pub fn register(&mut self, key: &str, req: &RegisterRequest, now: u64) -> Result<RunInfo> {
        if req.info.wire_version != WIRE_VERSION {
            return Err(NodeError::Rejected(format!(
                "worker speaks wire version {}, this coordinator {WIRE_VERSION}: use matching builds",
                req.info.wire_version
            )));
        }
        let auth = &self.cfg.auth;
        if !auth.allow.is_empty() && !auth.allow.iter().any(|k| k == key) {
            return Err(NodeError::Forbidden(format!(
                "key {} is not on this run's allowlist",
                short(key)
            )));
        }
        if let Some(secret) = &auth.join_secret {
            if req.join_proof.as_deref() != Some(join_proof(secret, key).as_str()) {
                return Err(NodeError::Forbidden(
                    "this run needs its join secret (worker --join-secret), and the one given is missing or wrong".into(),
                ));
            }
        }
        self.store.upsert_worker(key, &req.info, now)?;
        Ok(self.run_info())
    }

    /// Expires lapsed leases and closes rounds that are ready. A block whose merge
    /// fails is logged and left for the next tick; the other blocks go on.
    pub fn tick(&mut self, now: u64) -> Result<()> {
        let max_lease = (self.cfg.faults.max_lease_secs * 1000.0) as u64;
        self.store.expire_leases(now, max_lease)?;
        for block in 0..self.cfg.blocks {
            if let Err(e) = self.maybe_close(block, now) {
                tracing::error!("block {}: round not closed: {e}", block + 1);
            }
        }
        Ok(())
    }

    /// Hands the worker a lease, tells it to wait, or that the run is done.
    pub fn request_work(&mut self, key: &str, info: &WorkerInfo, now: u64) -> Result<WorkReply> {
        if self.store.is_flagged(key)? {
            return Err(NodeError::Forbidden(format!(
                "worker {} failed a spot check: it gets no more work in this run",
                short(key)
            )));
        }
        let (rate, last_block) = self.require_registered(key)?;
        self.store.touch_worker(key, info.step_rate, now)?;
        self.tick(now)?;
        let heads = self.store.heads()?;
        // A retried request (the reply was lost) gets the lease it already holds.
        if let Some(id) = self.store.active_lease_of(key)? {
            let lease = self.store.lease(id)?.expect("active lease exists");
            return Ok(WorkReply::Lease(
                self.lease_reply(&lease, &heads[lease.block]),
            ));
        }
        let rounds = self.cfg.training.rounds;
        if heads.iter().all(|h| h.version >= rounds) {
            return Ok(WorkReply::Done);
        }
        let cap = self.cfg.training.workers_per_block;
        // Blocks this worker can hold in its memory (0 = it did not say).
        let fits = |b: usize| info.memory_bytes == 0 || self.train_memory(b) <= info.memory_bytes;
        if !(0..self.cfg.blocks).any(fits) {
            let need = (0..self.cfg.blocks)
                .map(|b| self.train_memory(b))
                .min()
                .unwrap_or(0);
            return Err(NodeError::Rejected(format!(
                "this worker reports {} MB of free memory; training the smallest block needs about {} MB",
                info.memory_bytes >> 20,
                need >> 20
            )));
        }
        let mut best: Option<(u32, bool, u64, usize, u32)> = None;
        for h in heads.iter().filter(|h| h.version < rounds && fits(h.block)) {
            let (active, issued) = self.store.round_leases(h.block, h.version)?;
            let pending = self.store.pending(h.block, h.version)?.len() as u32;
            let busy = active + pending;
            if busy >= cap {
                continue;
            }
            let cand = (
                busy,
                last_block != Some(h.block),
                h.version,
                h.block,
                issued,
            );
            if best.is_none_or(|b| (cand.0, cand.1, cand.2, cand.3) < (b.0, b.1, b.2, b.3)) {
                best = Some(cand);
            }
        }
        let Some((_, _, version, block, issued)) = best else {
            return Ok(WorkReply::Wait { retry_ms: 1000 });
        };
        let t = &self.cfg.training;
        let rate = info.step_rate.or(rate);
        let steps = match rate {
            Some(r) if t.round_seconds > 0.0 && r > 0.0 => ((r * t.round_seconds).round() as i64)
                .clamp((t.local_steps / 4).max(1), t.local_steps * 4),
            _ => t.local_steps,
        };
        let used = self.store.used_slots(block, version)?;
        let slot = (0..cap).find(|s| !used.contains(s)).unwrap_or(issued % cap);
        // A lease's randomness follows its round and slot, not how many leases were
        // issued: a refused or lapsed lease does not change what the honest worker who
        // takes the slot next computes (and a spot check can recompute it).
        let seed = seed_of(self.cfg.seed, block, version, slot);
        let expires = now + self.lease_ms();
        let id = self
            .store
            .insert_lease(key, block, version, slot, steps, seed, now, expires)?;
        let lease = self.store.lease(id)?.expect("just inserted");
        Ok(WorkReply::Lease(self.lease_reply(&lease, &heads[block])))
    }

    /// Rough memory to train block `b`: weights, gradients and two AdamW moments (16 B
    /// per parameter), activations kept for backward (~40 B per width x layer x token of
    /// a batch, plus the logits), and the corpus and runtime (~256 MB).
    fn train_memory(&self, b: usize) -> u64 {
        let params: usize = self.shapes[b]
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum();
        let m = self.model.manifest.part_model(b);
        let tokens = (self.cfg.training.batch * m.window) as u64;
        16 * params as u64
            + tokens * (40 * (m.d_model * m.n_layers) as u64 + 3 * 4 * 257)
            + (256 << 20)
    }

    fn lease_ms(&self) -> u64 {
        (self.cfg.faults.lease_secs * 1000.0) as u64
    }

    fn lease_reply(&self, l: &crate::store::LeaseRow, head: &BlockHead) -> Lease {
        let t = &self.cfg.training;
        Lease {
            id: l.id,
            block: l.block,
            version: l.version,
            weights_hash: head.wire.clone(),
            steps: l.steps,
            batch: t.batch,
            seed: l.seed,
            shard_index: l.slot,
            shard_count: t.workers_per_block,
            schedule_step: l.version as i64 * t.local_steps,
            schedule_total: self.cfg.schedule_total(),
            schedule_span: t.local_steps,
            codec: self.cfg.wire.codec.clone(),
            lease_ms: self.lease_ms(),
        }
    }

    /// Renews a lease; false when its round has moved on (the worker should stop).
    pub fn heartbeat(&mut self, key: &str, lease: i64, now: u64) -> Result<bool> {
        self.require_registered(key)?;
        let l = self.owned_lease(key, lease)?;
        self.store.touch_worker(key, None, now)?;
        let head_version = self.store.heads()?[l.block].version;
        let open = l.version == head_version
            && (l.state == lease_state::ACTIVE || l.state == lease_state::EXPIRED);
        if open {
            self.store.set_lease_state(lease, lease_state::ACTIVE)?;
            self.store.renew_lease(lease, now + self.lease_ms())?;
        }
        Ok(open)
    }

    /// Checks that `hash` is a committed checkpoint a registered worker may download;
    /// returns its file and block.
    pub fn checkpoint_file(&self, key: &str, hash: &str) -> Result<(PathBuf, usize)> {
        self.require_registered(key)?;
        let block = self.store.is_checkpoint(hash)?.ok_or_else(|| {
            NodeError::NotFound(format!("no checkpoint with blake3 {}", short(hash)))
        })?;
        Ok((self.store.blob_path(hash), block))
    }

    /// Counts bytes a worker downloaded.
    pub fn count_download(&self, key: &str, block: usize, bytes: u64) -> Result<()> {
        self.store.add_traffic(key, block, 0, bytes)
    }

    /// Records an upload refused before it reached [`Coordinator::submit_update`] (bad
    /// signature, interrupted, oversized); counted against the lease's block if known.
    /// No receipt: the key is only claimed, and anyone could otherwise write permanent
    /// receipts in somebody else's name.
    pub fn record_rejection(
        &mut self,
        claimed_key: &str,
        lease: Option<i64>,
        bytes: u64,
        reason: &str,
        now: u64,
    ) -> Result<i64> {
        let row = lease.and_then(|id| self.store.lease(id).ok().flatten());
        let id = self.store.insert_update(
            &NewUpdate {
                lease,
                worker: claimed_key,
                block: row.as_ref().map(|l| l.block),
                version: row.as_ref().map(|l| l.version),
                bytes,
                state: update_state::REJECTED,
                reason: Some(reason.to_string()),
                ..Default::default()
            },
            now,
        )?;
        if let Some(l) = row.as_ref().filter(|l| l.worker == claimed_key) {
            self.store.add_traffic(claimed_key, l.block, bytes, 0)?;
        }
        Ok(id)
    }

    /// Records a refused authenticated upload: an update row with its reason, the claim
    /// (the worker's signed one when valid, else the coordinator's account), and a
    /// receipt. A failure to write the receipt is logged, not returned: the refusal
    /// stands, and the receipt is issued at the next start-up.
    #[allow(clippy::too_many_arguments)]
    fn reject(
        &mut self,
        key: &str,
        lease: Option<i64>,
        bytes: u64,
        reason: &str,
        body_hash: Option<&str>,
        claim: Option<(Claim, String)>,
        now: u64,
    ) -> Result<i64> {
        let id = self.record_rejection(key, lease, bytes, reason, now)?;
        let row = lease.and_then(|l| self.store.lease(l).ok().flatten());
        let (claim, sig) = match claim {
            Some((c, s)) => (c, Some(s)),
            None => (
                trust::unsigned_claim(key, row.as_ref(), body_hash, None),
                None,
            ),
        };
        let json = serde_json::to_string(&claim).expect("claims serialise");
        self.store.put_claim(id, &json, sig.as_deref())?;
        let decision = Decision {
            accepted: false,
            reason: Some(reason.to_string()),
            resulting_version: None,
            heldout_before: None,
            heldout_after: None,
            time_ms: now,
        };
        if let Err(e) = self.issue_receipt(Some(id), claim, sig, decision, now) {
            tracing::error!("update {id}: receipt deferred to the next start: {e}");
        }
        Ok(id)
    }

    /// Signs a receipt, appends it to the ledger, signs the new tree head, and notes
    /// that `update` (if any) has its receipt.
    fn issue_receipt(
        &mut self,
        update: Option<i64>,
        claim: Claim,
        sig: Option<String>,
        decision: Decision,
        now: u64,
    ) -> Result<u64> {
        let receipt = Receipt::issue(claim, sig, decision, &self.identity);
        let index = self.ledger.append(self.store.conn(), &receipt)?;
        if let Some(u) = update {
            self.store.mark_receipted(u, index)?;
        }
        self.ledger.sign_head(self.store.conn(), now)?;
        Ok(index)
    }

    /// Issues the receipts a crash left out: every merged update, and every refused
    /// authenticated one (its claim is on record), that has no receipt yet.
    fn issue_missing_receipts(&mut self, now: u64) -> Result<usize> {
        let missing = self.store.unreceipted()?;
        for (id, version, state, reason) in &missing {
            if state == update_state::APPLIED {
                let merged_into = version.map(|v| v as u64 + 1);
                self.merge_receipt(*id, merged_into, None, now)?;
            } else {
                let reason = reason.clone().unwrap_or_else(|| "refused".into());
                self.merge_receipt(*id, None, Some(reason), now)?;
            }
        }
        Ok(missing.len())
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

    /// Validates and stores an update; may close its round. Every refusal is recorded
    /// with its reason, and gets a receipt in the ledger, before the error is returned.
    /// `claim` is the worker's signed claim (JSON-decoded) and its signature.
    pub fn submit_update(
        &mut self,
        key: &str,
        lease_id: i64,
        body: &[u8],
        loss: Option<f64>,
        claim: Option<(Claim, String)>,
        now: u64,
    ) -> Result<UpdateReply> {
        self.require_registered(key)?;
        if self.store.is_flagged(key)? {
            return Err(NodeError::Forbidden(format!(
                "worker {} failed a spot check: its updates are no longer accepted in this run",
                short(key)
            )));
        }
        let body_hash = content_hash(body);
        // A re-sent upload whose reply was lost: same lease, same bytes. Answer as before.
        if let Some((id, hash)) = self.store.update_of_lease(lease_id)? {
            let lease = self.store.lease(lease_id)?;
            if lease.as_ref().is_some_and(|l| l.worker == key) && hash == body_hash {
                let block = lease.expect("checked").block;
                let block_version = self.store.heads()?[block].version;
                return Ok(UpdateReply {
                    update_id: id,
                    block_version,
                });
            }
        }
        let checked = self.check_update(key, lease_id, body).and_then(|lease| {
            let verdict = self
                .vet(key, &lease, body, &body_hash, claim.as_ref())
                .map_err(NodeError::Rejected)?;
            Ok((lease, verdict))
        });
        match checked {
            Ok((lease, verdict)) => {
                let hash = self.store.put_blob(body)?;
                let id = self.store.accept_update(
                    &NewUpdate {
                        lease: Some(lease_id),
                        worker: key,
                        block: Some(lease.block),
                        version: Some(lease.version),
                        bytes: body.len() as u64,
                        hash: Some(hash),
                        steps: Some(lease.steps),
                        loss,
                        state: update_state::PENDING,
                        reason: None,
                    },
                    now,
                )?;
                let (c, sig) = claim.expect("vetted updates carry a claim");
                let json = serde_json::to_string(&c).expect("claims serialise");
                self.store.put_claim(id, &json, Some(&sig))?;
                if let Some((before, after)) = verdict.heldout {
                    self.store.put_screening(id, before, after)?;
                }
                self.store.touch_worker(key, None, now)?;
                if let Err(e) = self.maybe_close(lease.block, now) {
                    tracing::error!("block {}: round not closed: {e}", lease.block + 1);
                }
                let block_version = self.store.heads()?[lease.block].version;
                Ok(UpdateReply {
                    update_id: id,
                    block_version,
                })
            }
            Err(e) => {
                // The claim rides along only if it is the worker's own, valid one.
                let lease = self.store.lease(lease_id)?;
                let valid = claim.filter(|(c, sig)| {
                    lease
                        .as_ref()
                        .is_some_and(|l| trust::check_claim(c, sig, key, l, &body_hash).is_ok())
                });
                self.reject(
                    key,
                    Some(lease_id),
                    body.len() as u64,
                    &e.to_string(),
                    Some(&body_hash),
                    valid,
                    now,
                )?;
                Err(e)
            }
        }
    }

    /// The checks beyond shape and size ([`crate::trust`]): the worker's claim, replays,
    /// held-out screening, spot checks. Returns what to record; Err is the reason to
    /// reject.
    fn vet(
        &mut self,
        key: &str,
        lease: &crate::store::LeaseRow,
        body: &[u8],
        body_hash: &str,
        claim: Option<&(Claim, String)>,
    ) -> std::result::Result<Verdict, String> {
        let Some((c, sig)) = claim else {
            return Err(
                "no signed claim came with the update (workers must sign what they upload)".into(),
            );
        };
        trust::check_claim(c, sig, key, lease, body_hash)?;
        if let Some((id, worker)) = self
            .store
            .accepted_with_hash(body_hash)
            .map_err(|e| e.to_string())?
        {
            return Err(format!(
                "replay: these exact bytes were already accepted as update {id} from worker {}",
                short(&worker)
            ));
        }
        let (delta, codec) = codec::decode(body, &self.shapes[lease.block], usize::MAX)
            .map_err(|e| e.to_string())?;
        let heldout = self.screen(lease.block, &delta)?;
        self.spot_check(key, lease, &delta, &codec)?;
        Ok(Verdict { heldout })
    }

    /// Held-out screening: the block's loss after this update alone, against before.
    fn screen(
        &self,
        block: usize,
        delta: &Arrays,
    ) -> std::result::Result<Option<(f64, f64)>, String> {
        let Some(screen) = self.screens.get(block) else {
            return Ok(None);
        };
        let mut after = self.current[block].clone();
        for (name, w) in after.iter_mut() {
            w.data
                .iter_mut()
                .zip(&delta[name].data)
                .for_each(|(w, d)| *w += d);
        }
        let before = self.heldout[block];
        let after = screen.loss(&after).map_err(|e| e.to_string())?;
        let threshold = self.cfg.trust.screen_threshold;
        if !after.is_finite() || after - before > threshold {
            return Err(format!(
                "held-out screening: this update alone takes block {}'s held-out loss from {before:.4} to {after:.4} (+{:.4} nats/byte; the limit is {threshold})",
                block + 1,
                after - before
            ));
        }
        Ok(Some((before, after)))
    }

    /// Spot check (a keyed sample of updates): recompute the update from the same
    /// start weights, shard, seed and steps and compare. A mismatch flags the worker.
    fn spot_check(
        &mut self,
        key: &str,
        lease: &crate::store::LeaseRow,
        delta: &Arrays,
        codec: &Codec,
    ) -> std::result::Result<(), String> {
        let fraction = self.cfg.trust.spot_check_fraction;
        // Keyed on the lease, not the bytes: re-sending altered bytes on the same lease
        // does not buy a new draw.
        let secret = blake3::derive_key("blocktrain spot-check sample", &self.identity.secret());
        if !trust::sampled_for_spot_check(&secret, &format!("lease/{}", lease.id), fraction)
            || self.store.has_own_data(key).map_err(|e| e.to_string())?
        {
            return Ok(());
        }
        let check = self.recompute(lease, delta, codec).map_err(|e| {
            // Our own failure to recompute is not the worker's fault: log, accept.
            tracing::error!("spot check of lease {} could not run: {e}", lease.id);
            e.to_string()
        });
        let Ok(check) = check else { return Ok(()) };
        if check.passed() {
            tracing::info!(
                "spot check of lease {} passed (relative error {:.2e})",
                lease.id,
                check.error
            );
            return Ok(());
        }
        let reason = format!(
            "spot check: recomputing this update from the same start weights, data, seed and steps gives a different delta (relative error {:.3} > tolerance {:.1e})",
            check.error, check.tolerance
        );
        // Consequences: the lease is void (no retry on it) and the worker gets no more.
        self.store
            .flag_worker(key, &reason)
            .map_err(|e| e.to_string())?;
        self.store
            .set_lease_state(lease.id, crate::store::lease_state::EXPIRED)
            .map_err(|e| e.to_string())?;
        Err(reason)
    }

    fn recompute(
        &mut self,
        lease: &crate::store::LeaseRow,
        delta: &Arrays,
        codec: &Codec,
    ) -> Result<crate::verify::SpotCheck> {
        if self.corpus.is_none() {
            self.corpus = Some(
                self.model
                    .manifest
                    .plan
                    .dataset
                    .load(blocktrain_model::data::Split::Train)?,
            );
        }
        let head = self.store.heads()?[lease.block].clone();
        let base = crate::worker::decode_checkpoint(&self.store.get_blob(&head.wire)?)
            .map_err(|e| NodeError::Config(e.to_string()))?;
        let reply = self.lease_reply(lease, &head);
        let corpus = self.corpus.as_deref().expect("loaded above");
        let shard = crate::worker::shard_of(
            corpus,
            reply.shard_index,
            reply.shard_count,
            self.model.manifest.model.window,
        );
        let job = crate::worker::LocalJob {
            manifest: &self.model.manifest,
            block: lease.block,
            base: &base,
            lease: &reply,
            shard,
        };
        crate::verify::spot_check(&job, delta, codec, tch::Device::Cpu)
    }

    fn check_update(
        &self,
        key: &str,
        lease_id: i64,
        body: &[u8],
    ) -> Result<crate::store::LeaseRow> {
        let lease = self.owned_lease(key, lease_id)?;
        if lease.state == lease_state::DELIVERED {
            return Err(NodeError::Rejected(format!(
                "lease {lease_id} already delivered its update"
            )));
        }
        let head_version = self.store.heads()?[lease.block].version;
        if lease.version != head_version || lease.state == lease_state::SUPERSEDED {
            return Err(NodeError::Stale(format!(
                "block {} is at version {head_version}; this update was computed from version {}",
                lease.block + 1,
                lease.version
            )));
        }
        let shapes = &self.shapes[lease.block];
        let limit = update_limit(shapes) as usize;
        if body.len() > limit {
            return Err(NodeError::TooLarge(format!(
                "update of {} bytes; the limit is {limit}",
                body.len()
            )));
        }
        let (delta, codec) =
            codec::decode(body, shapes, limit).map_err(|e| NodeError::Rejected(e.to_string()))?;
        let bound = self.cfg.wire.max_delta_ratio * self.cfg.optim.lr * lease.steps as f64;
        for (name, a) in &delta {
            let rms = merge::rms(a);
            if rms > bound {
                return Err(NodeError::Rejected(format!(
                    "{name}: delta RMS {rms:.3e} exceeds {bound:.3e} ({} x lr {} x {} steps): no AdamW run moves weights that far",
                    self.cfg.wire.max_delta_ratio, self.cfg.optim.lr, lease.steps
                )));
            }
        }
        // At least as precise as the run's codec: a worker cannot pick a lossier one
        // (whose looser spot-check tolerance, or none for top-k, it could hide behind).
        let rank = |c: &Codec| match c {
            Codec::Fp32 => 0,
            Codec::Fp16 => 1,
            Codec::Int8 { .. } => 2,
            Codec::TopK { .. } => 3,
        };
        let expected =
            Codec::parse(&self.cfg.wire.codec).map_err(|e| NodeError::Config(e.to_string()))?;
        if rank(&codec) > rank(&expected) {
            return Err(NodeError::Rejected(format!(
                "update encoded as {codec:?}, lossier than this run's {}",
                self.cfg.wire.codec
            )));
        }
        Ok(lease)
    }

    fn maybe_close(&mut self, block: usize, now: u64) -> Result<()> {
        let head = self.store.heads()?[block].clone();
        let pending = self.store.pending(block, head.version)?;
        let Some(first) = pending.first() else {
            return Ok(());
        };
        let timeout = (self.cfg.faults.round_timeout_secs * 1000.0) as u64;
        if (pending.len() as u32) < self.cfg.quorum() && now < first.received_ms + timeout {
            return Ok(());
        }
        let shapes = self.shapes[block].clone();
        let shapes = &shapes;
        let mut deltas = Vec::with_capacity(pending.len());
        let mut merged = Vec::with_capacity(pending.len());
        for p in &pending {
            // A body that cannot be read back (disk trouble) is rejected, not fatal.
            let read = self.store.get_blob(&p.hash).and_then(|bytes| {
                codec::decode(&bytes, shapes, usize::MAX)
                    .map_err(|e| NodeError::Config(e.to_string()))
            });
            match read {
                Ok((d, _)) => {
                    deltas.push((d, p.steps));
                    merged.push(p);
                }
                Err(e) => {
                    tracing::error!("update {} unreadable at merge: {e}", p.id);
                    let reason = format!("stored body unreadable at merge: {e}");
                    self.store.reject_pending(p.id, &reason)?;
                    if let Err(r) = self.merge_receipt(p.id, None, Some(reason), now) {
                        tracing::error!("update {}: receipt deferred to the next start: {r}", p.id);
                    }
                }
            }
        }
        if deltas.is_empty() {
            return Ok(());
        }
        let pending = merged;
        let mean = merge::merge_deltas(&deltas, &self.cfg.outer.merge_rule()?);
        let momentum = match &head.momentum {
            Some(h) => {
                codec::decode(&self.store.get_blob(h)?, shapes, usize::MAX)
                    .map_err(|e| NodeError::Config(e.to_string()))?
                    .0
            }
            None => Arrays::new(),
        };
        let mut weights = self.current[block].clone();
        let momentum = merge::outer_step(&mut weights, &mean, momentum, &self.cfg.outer);
        let bytes = encode_weights(&weights);
        let new_head = BlockHead {
            block,
            version: head.version + 1,
            weights: self.store.put_blob(&bytes)?,
            wire: self.store.put_blob(&encode_wire(&weights, &self.cfg))?,
            momentum: if momentum.is_empty() {
                None
            } else {
                Some(
                    self.store
                        .put_blob(&codec::encode(&momentum, Codec::Fp32))?,
                )
            },
            steps: head.steps + pending.iter().map(|p| p.steps).sum::<i64>(),
        };
        let ids: Vec<i64> = pending.iter().map(|p| p.id).collect();
        self.store.commit_version(&new_head, &ids, now)?;
        // The version is committed: memory follows it before any bookkeeping that can
        // fail (receipts, held-out history), so a failure there never forks the state.
        self.current[block] = weights;
        self.model.save_weights(block, &bytes, new_head.steps)?;
        for &id in &ids {
            if let Err(e) = self.merge_receipt(id, Some(new_head.version), None, now) {
                tracing::error!("update {id}: receipt deferred to the next start: {e}");
            }
        }
        if let Some(screen) = self.screens.get(block) {
            match screen.loss(&self.current[block]) {
                Ok(loss) => {
                    self.store
                        .put_version_loss(block, new_head.version, loss, now)?;
                    self.heldout[block] = loss;
                }
                Err(e) => tracing::error!("block {}: held-out loss not computed: {e}", block + 1),
            }
        }
        tracing::info!(
            "block {}: version {} -> {} from {} update(s), {} local steps in all",
            block + 1,
            head.version,
            new_head.version,
            ids.len(),
            new_head.steps
        );
        let keep = self.cfg.faults.keep_versions;
        if keep > 0 && new_head.version >= keep {
            self.store
                .prune_versions(block, new_head.version + 1 - keep)?;
        }
        // Drop merged update bodies nothing else names (identical bodies share a blob).
        for p in &pending {
            if !self.store.blob_referenced(&p.hash)? {
                let _ = std::fs::remove_file(self.store.blob_path(&p.hash));
            }
        }
        Ok(())
    }

    /// The receipt of an update decided at merge time: merged into `version`, or (None)
    /// rejected there. Its claim and screening numbers were stored when it arrived.
    fn merge_receipt(
        &mut self,
        update: i64,
        version: Option<u64>,
        reason: Option<String>,
        now: u64,
    ) -> Result<u64> {
        let (claim, sig) = match self.store.claim(update)? {
            Some((json, sig)) => (
                serde_json::from_str(&json).map_err(|e| {
                    NodeError::Config(format!("update {update}: stored claim: {e}"))
                })?,
                sig,
            ),
            // No claim on record (a crash between accepting and storing it): the
            // coordinator's own account, marked as not signed by the worker.
            None => {
                let (worker, lease, hash) = self.store.update_origin(update)?.ok_or_else(|| {
                    NodeError::Config(format!("update {update} is not on record"))
                })?;
                let row = lease.and_then(|l| self.store.lease(l).ok().flatten());
                (
                    trust::unsigned_claim(&worker, row.as_ref(), hash.as_deref(), None),
                    None,
                )
            }
        };
        let screening = self.store.screening(update)?;
        let decision = Decision {
            accepted: version.is_some(),
            reason: match version {
                Some(_) => None,
                None => Some(reason.unwrap_or_else(|| "refused".into())),
            },
            resulting_version: version,
            heldout_before: screening.map(|s| s.0),
            heldout_after: screening.map(|s| s.1),
            time_ms: now,
        };
        self.issue_receipt(Some(update), claim, sig, decision, now)
    }

    /// Held-out loss of every evaluated version, per block: (version, time_ms, loss).
    pub fn heldout_history(&self) -> Result<Vec<Vec<(u64, u64, f64)>>> {
        (0..self.cfg.blocks)
            .map(|b| self.store.version_losses(b))
            .collect()
    }

    /// The run's status (blocks, workers, bytes moved, recent updates).
    pub fn status(&self) -> Result<Status> {
        let traffic: Vec<Traffic> = self.store.traffic()?;
        let heads = self.store.heads()?;
        let mut blocks = Vec::new();
        for h in &heads {
            let (active, _) = self.store.round_leases(h.block, h.version)?;
            blocks.push(BlockStatus {
                block: h.block,
                version: h.version,
                rounds: self.cfg.training.rounds,
                active_leases: active,
                pending_updates: self.store.pending(h.block, h.version)?.len(),
                steps: h.steps,
                weights: h.weights.clone(),
                bytes_up: traffic
                    .iter()
                    .filter(|t| t.block == h.block)
                    .map(|t| t.up)
                    .sum(),
                bytes_down: traffic
                    .iter()
                    .filter(|t| t.block == h.block)
                    .map(|t| t.down)
                    .sum(),
                heldout: self.heldout.get(h.block).copied(),
            });
        }
        let workers = self
            .store
            .workers()?
            .into_iter()
            .map(
                |(key, device, step_rate, data_blake3, data_bytes, last_seen_ms)| WorkerStatus {
                    bytes_up: traffic
                        .iter()
                        .filter(|t| t.worker == key)
                        .map(|t| t.up)
                        .sum(),
                    bytes_down: traffic
                        .iter()
                        .filter(|t| t.worker == key)
                        .map(|t| t.down)
                        .sum(),
                    key,
                    device,
                    step_rate,
                    data_blake3,
                    data_bytes,
                    last_seen_ms,
                },
            )
            .collect();
        Ok(Status {
            done: heads.iter().all(|h| h.version >= self.cfg.training.rounds),
            blocks,
            workers,
            updates: self.store.update_counts()?.into_iter().collect(),
            recent: self.store.recent_updates(20)?,
            bytes_up: traffic.iter().map(|t| t.up).sum(),
            bytes_down: traffic.iter().map(|t| t.down).sum(),
            flagged: self
                .store
                .flagged()?
                .into_iter()
                .map(|(key, failed_checks, last_reason)| FlaggedWorker {
                    key,
                    failed_checks,
                    last_reason,
                })
                .collect(),
        })
    }

    /// Version history of a block (for invariant checks): (version, weights hash).
    pub fn history(&self, block: usize) -> Result<Vec<(u64, String)>> {
        self.store.history(block)
    }
}

/// The first 12 hex digits of a key or hash, for messages.
pub fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}
