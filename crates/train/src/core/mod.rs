//! The coordinator's decisions as a pure state machine: who trains which block from
//! which version, which lease holds which slot, when a lease lapses, and when a round is
//! ready to close. It is modelled on Psyche's coordinator `tick`: plain data in memory,
//! every transition a method that takes the time (and nothing else from the outside),
//! no I/O, no database, no tensors. Its unit tests (`core/tests/`) need neither a
//! temporary directory nor libtorch.
//!
//! The [`crate::coordinator::Coordinator`] is the shell around it: it rebuilds the core
//! from SQLite at start-up ([`Rebuild`]), journals what must survive a crash (a
//! registration, an issued lease, a decided upload, a flag, a committed version) before
//! it replies, and does the compute (vetting, merging) the decisions call for.
//!
//! Two kinds of state:
//! - **hard** (journaled before the reply): workers and their flags, issued leases and
//!   their decided states, pending updates, block versions. The shell changes these
//!   only while it also holds its own lock, and only after the journal's transaction
//!   committed, so a failed write leaves the core as it was.
//! - **soft** (in memory, written to the journal at the next tick, [`Core::take_soft`]):
//!   heartbeat renewals, lapses, revivals, a worker's last contact and step rate. A
//!   crash loses what changed since the last write, which is harmless: a restarted
//!   coordinator gives every open lease a fresh life anyway, and the soft state is
//!   written before every new lease, so a lapse whose slot was re-leased is never lost. This is what lets a heartbeat or a work
//!   request that hands out nothing be answered from memory, without SQLite and without
//!   waiting for compute ([`crate::server`] does so).
use std::collections::{BTreeMap, HashMap, HashSet};

use blocktrain_protocol::wire::Lease;

mod lease;
mod rebuild;
mod round;
#[cfg(test)]
mod tests;

pub use lease::{sampled, Beat, Registered, Work};
pub use rebuild::Rebuild;
pub use round::{refusal_state, StallChange};

/// Lease states.
pub mod lease_state {
    /// Training; renewed by heartbeats.
    pub const ACTIVE: &str = "active";
    /// Its update arrived.
    pub const DELIVERED: &str = "delivered";
    /// No heartbeat in time; its slot was freed.
    pub const EXPIRED: &str = "expired";
    /// The round closed without it.
    pub const SUPERSEDED: &str = "superseded";
    /// Its one upload was refused (screen, norm, claim, shape): the lease is closed, and
    /// the slot is re-leased with a fresh seed.
    pub const REFUSED: &str = "refused";
    /// A spot check found its update false: closed, and never revived.
    pub const VOID: &str = "void";
}

/// A lease.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseRow {
    /// Id.
    pub id: i64,
    /// Holder.
    pub worker: String,
    /// Block.
    pub block: usize,
    /// Base version.
    pub version: u64,
    /// Shard slot.
    pub slot: u32,
    /// Local steps.
    pub steps: i64,
    /// Seed.
    pub seed: u64,
    /// When it was issued.
    pub issued_ms: u64,
    /// Deadline.
    pub expires_ms: u64,
    /// State ([`lease_state`]).
    pub state: String,
    /// Trained on the run's shard although the worker has its own data (a check lease).
    pub public: bool,
}

/// The run's rules, as the core needs them (from the run's configuration).
#[derive(Clone, Debug)]
pub struct Rules {
    /// Blocks.
    pub blocks: usize,
    /// Versions every block goes through.
    pub rounds: u64,
    /// Workers a block takes per round.
    pub workers_per_block: u32,
    /// Accepted updates that close a round.
    pub quorum: u32,
    /// A lease lapses this long after its last renewal, ms.
    pub lease_ms: u64,
    /// ... and this long after it was issued, whatever its renewals, ms.
    pub max_lease_ms: u64,
    /// A round closes this long after its first update with what it has, ms.
    pub round_timeout_ms: u64,
    /// K: an update computed from version v-k, k <= K, joins the block's current round
    /// (`[training] max_staleness`; 0: only from the current version).
    pub max_staleness: u64,
    /// Unfinished blocks with no progress for this long are stalled, ms.
    pub stall_ms: u64,
    /// H, local steps at the reference rate.
    pub local_steps: i64,
    /// Target seconds per round (0: always H steps).
    pub round_seconds: f64,
    /// Length of every block's LR schedule.
    pub schedule_total: i64,
    /// Windows per step.
    pub batch: i64,
    /// Update codec workers use.
    pub codec: String,
    /// Leases carry the block's AdamW moments (`[training] optimizer_state = "carry"`).
    pub carry_moments: bool,
    /// Fraction of an own-data worker's leases trained on the run's shard (and checked).
    pub spot_check_fraction: f64,
    /// The run's public seed (lease seeds follow block, version and slot).
    pub run_seed: u64,
    /// Rough memory to train each block, bytes.
    pub train_memory: Vec<u64>,
    /// Who may register.
    pub admission: Admission,
}

/// Registration rules (`[auth]`).
#[derive(Clone, Debug, Default)]
pub struct Admission {
    /// Keys allowed to register (empty: any).
    pub allow: Vec<String>,
    /// The run's join secret.
    pub join_secret: Option<String>,
    /// Invite tokens, each bound to the first key that uses it.
    pub invites: Vec<String>,
}

/// Keys derived from the coordinator's secret: draws no worker can predict or choose.
#[derive(Clone, Debug)]
pub struct Secrets {
    /// Re-seeds a slot after a refusal.
    pub reseed: [u8; 32],
    /// Picks an own-data worker's check leases.
    pub check_lease: [u8; 32],
}

/// A registered worker.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerState {
    /// Measured steps/s.
    pub step_rate: Option<f64>,
    /// The block it trained last (its checkpoint is cached there).
    pub last_block: Option<usize>,
    /// It trains on its own data.
    pub own_data: bool,
    /// A spot check found it false: no more work.
    pub flagged: bool,
    /// Last contact.
    pub last_seen_ms: u64,
}

/// An accepted update waiting for its round to close.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    /// Update id.
    pub update: i64,
    /// Its lease.
    pub lease: Option<i64>,
    /// blake3 of its body.
    pub hash: String,
    /// Local steps it represents.
    pub steps: i64,
    /// When it arrived.
    pub received_ms: u64,
    /// The version it was computed from (its lease's): the round's own version, or up
    /// to `max_staleness` before it (a stale update; its staleness k is the difference).
    pub base: u64,
}

/// One block: its version and the round open on it.
#[derive(Clone, Debug)]
struct BlockState {
    version: u64,
    /// blake3 of the copy workers download of this version and of the `max_staleness`
    /// versions before it (what a lease of each trains from).
    wires: BTreeMap<u64, String>,
    /// This round's leases, by id, and the leases of up to `max_staleness` versions
    /// before it that may still deliver into it (open, or delivered into this round);
    /// other rounds' leases live in the journal only.
    leases: BTreeMap<i64, LeaseRow>,
    /// Leases whose one upload was decided in this round.
    decided: HashSet<i64>,
    pending: Vec<Pending>,
    /// Last accepted update or commit.
    last_progress_ms: u64,
    stalled: bool,
    /// Its round is being merged (off the coordinator's lock): no more uploads join it.
    closing: bool,
}

impl BlockState {
    /// Active leases (of this version and of older ones still open), and leases issued
    /// at this version.
    fn counts(&self) -> (u32, u32) {
        let active = self
            .leases
            .values()
            .filter(|l| l.state == lease_state::ACTIVE)
            .count();
        let issued = self
            .leases
            .values()
            .filter(|l| l.version == self.version)
            .count();
        (active as u32, issued as u32)
    }

    /// Workers on this round: active leases (an open lease of an older version
    /// included: its update would join this round) and delivered updates.
    fn busy(&self) -> u32 {
        self.counts().0 + self.pending.len() as u32
    }

    /// The copy of `version` workers download (None: older than the round's window).
    fn wire_of(&self, version: u64) -> Option<&String> {
        self.wires.get(&version)
    }

    /// Slots held by active leases or delivered updates (of any version: an open lease
    /// of an older version keeps its slot, so no lease of this round trains its shard).
    fn slot_taken(&self, slot: u32) -> bool {
        self.leases.values().any(|l| {
            l.slot == slot && (l.state == lease_state::ACTIVE || l.state == lease_state::DELIVERED)
        })
    }

    /// Leases of `slot` at this version closed by a refusal or a failed spot check.
    fn refusals(&self, slot: u32) -> u32 {
        self.leases
            .values()
            .filter(|l| {
                l.slot == slot
                    && l.version == self.version
                    && (l.state == lease_state::REFUSED || l.state == lease_state::VOID)
            })
            .count() as u32
    }
}

/// Soft state changed since the last [`Core::take_soft`], for the journal.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Soft {
    /// (lease id, state, expires_ms).
    pub leases: Vec<(i64, String, u64)>,
    /// (key, last_seen_ms, step_rate).
    pub workers: Vec<(String, u64, Option<f64>)>,
}

/// The coordinator's decision state.
#[derive(Clone, Debug)]
pub struct Core {
    rules: Rules,
    secrets: Secrets,
    workers: HashMap<String, WorkerState>,
    blocks: Vec<BlockState>,
    /// Block of every lease of a current round.
    lease_block: HashMap<i64, usize>,
    /// The active lease each worker holds.
    active_of: HashMap<String, i64>,
    /// Leases with an upload admitted and not yet decided.
    vetting: HashSet<i64>,
    invites: HashMap<String, String>,
    next_lease: i64,
    /// No active lease lapses before this (a lower bound: renewals only push it later).
    next_lapse_ms: u64,
    dirty_leases: HashSet<i64>,
    /// The unwritten soft state of leases a commit dropped from the core: still owed to
    /// the journal, or a lapse the commit did not supersede there (an older version's
    /// lease within `max_staleness`) would come back active at the next start.
    dropped_soft: Vec<(i64, String, u64)>,
    dirty_workers: HashSet<String>,
}

impl Core {
    /// The rules it runs by.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// A registered worker.
    pub fn worker(&self, key: &str) -> Option<&WorkerState> {
        self.workers.get(key)
    }

    /// Registered workers.
    pub fn workers(&self) -> impl Iterator<Item = (&String, &WorkerState)> {
        self.workers.iter()
    }

    /// A lease of a current round: of its block's current version, or of an older one
    /// still open within `max_staleness` (None: unknown, or no longer current).
    pub fn lease(&self, id: i64) -> Option<&LeaseRow> {
        let b = self.lease_block.get(&id)?;
        self.blocks[*b].leases.get(&id)
    }

    /// Block `b`'s committed version.
    pub fn version(&self, b: usize) -> u64 {
        self.blocks[b].version
    }

    /// Every block's committed version.
    pub fn versions(&self) -> Vec<u64> {
        self.blocks.iter().map(|b| b.version).collect()
    }

    /// Every block has all its versions.
    pub fn done(&self) -> bool {
        self.blocks.iter().all(|b| b.version >= self.rules.rounds)
    }

    /// Active leases of block `b`'s round.
    pub fn active_leases(&self, b: usize) -> u32 {
        self.blocks[b].counts().0
    }

    /// Updates waiting for block `b`'s round to close.
    pub fn pending(&self, b: usize) -> &[Pending] {
        &self.blocks[b].pending
    }

    /// Whether block `b` is marked stalled ([`Core::watch_stalls`]).
    pub fn stalled(&self, b: usize) -> bool {
        self.blocks[b].stalled
    }

    /// What a worker holding `l` is told (`POST /v1/work`).
    pub fn lease_reply(&self, l: &LeaseRow) -> Lease {
        let r = &self.rules;
        let b = &self.blocks[l.block];
        Lease {
            id: l.id,
            block: l.block,
            version: l.version,
            // The lease's own version's copy (an open lease of an older version trains
            // from that one); a lease the core holds always has it.
            // No fallback to another version's copy: a delta must be taken against the
            // copy of its own base (an empty hash fails the worker's download loudly).
            weights_hash: b.wire_of(l.version).cloned().unwrap_or_default(),
            steps: l.steps,
            batch: r.batch,
            seed: l.seed,
            shard_index: l.slot,
            shard_count: r.workers_per_block,
            schedule_step: l.version as i64 * r.local_steps,
            schedule_total: r.schedule_total,
            schedule_span: r.local_steps,
            codec: r.codec.clone(),
            lease_ms: r.lease_ms,
            public_shard: l.public,
            carry_moments: r.carry_moments,
        }
    }

    /// Soft state changed since the last call (the shell writes it at every tick).
    pub fn take_soft(&mut self) -> Soft {
        let mut soft = Soft {
            leases: std::mem::take(&mut self.dropped_soft),
            ..Soft::default()
        };
        for id in std::mem::take(&mut self.dirty_leases) {
            if let Some(l) = self.lease(id) {
                soft.leases.push((id, l.state.clone(), l.expires_ms));
            }
        }
        for key in std::mem::take(&mut self.dirty_workers) {
            if let Some(w) = self.workers.get(&key) {
                soft.workers.push((key, w.last_seen_ms, w.step_rate));
            }
        }
        soft.leases.sort_by_key(|l| l.0);
        soft.workers.sort_by(|a, b| a.0.cmp(&b.0));
        soft
    }

    /// Takes back soft state [`Core::take_soft`] gave out that did not reach the journal,
    /// so the next write tries it again (a lapse left unwritten could let a new lease's
    /// row and the lapsed one both be active in the journal).
    pub fn restore_soft(&mut self, soft: Soft) {
        for (id, state, expires) in soft.leases {
            match self.lease(id) {
                Some(_) => {
                    self.dirty_leases.insert(id);
                }
                None => self.dropped_soft.push((id, state, expires)),
            }
        }
        self.dirty_workers
            .extend(soft.workers.into_iter().map(|(key, _, _)| key));
    }

    /// Records a worker's contact (soft state).
    fn touch(&mut self, key: &str, step_rate: Option<f64>, now: u64) {
        if let Some(w) = self.workers.get_mut(key) {
            w.last_seen_ms = w.last_seen_ms.max(now);
            if step_rate.is_some() {
                w.step_rate = step_rate;
            }
            if !self.dirty_workers.contains(key) {
                self.dirty_workers.insert(key.to_string());
            }
        }
    }

    /// A lease of a current round, to change.
    fn lease_mut(&mut self, id: i64) -> Option<&mut LeaseRow> {
        let b = *self.lease_block.get(&id)?;
        self.blocks[b].leases.get_mut(&id)
    }

    /// Sets a lease's state, keeping the index of active leases.
    fn set_state(&mut self, id: i64, state: &str) {
        let Some(l) = self.lease_mut(id) else {
            return;
        };
        let was_active = l.state == lease_state::ACTIVE;
        l.state = state.to_string();
        let worker = l.worker.clone();
        if was_active && state != lease_state::ACTIVE && self.active_of.get(&worker) == Some(&id) {
            self.active_of.remove(&worker);
        }
        if state == lease_state::ACTIVE {
            self.active_of.insert(worker, id);
        }
    }
}

/// A lease's seed: the run's seed, block, version and slot (so a lapsed lease does not
/// change what the next holder of its slot computes).
pub fn seed_of(run_seed: u64, block: usize, version: u64, slot: u32) -> u64 {
    let h = blake3::hash(format!("{run_seed}/{block}/{version}/{slot}").as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}
