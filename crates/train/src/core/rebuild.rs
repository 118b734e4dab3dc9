//! Start-up: the core rebuilt from what the journal holds ([`Rebuild`], [`Core::new`]).
//! Kept apart from the state machine's transitions: this runs once per start, and holds
//! the rules for which journaled leases and updates a restarted core takes back.
use std::collections::{BTreeMap, HashMap, HashSet};

use super::{lease_state, BlockState, Core, LeaseRow, Pending, Rules, Secrets, WorkerState};

/// What the journal holds, to rebuild the core from at start-up.
#[derive(Clone, Debug, Default)]
pub struct Rebuild {
    /// Registered workers.
    pub workers: HashMap<String, WorkerState>,
    /// Per block: committed version, its wire hash, last progress (ms).
    pub blocks: Vec<(u64, String, u64)>,
    /// (block, version, wire hash) of the `max_staleness` versions before each block's
    /// current one (their files are kept: `faults.keep_versions` > K).
    pub old_wires: Vec<(usize, u64, String)>,
    /// Leases of each block's current version and of the `max_staleness` versions
    /// before it.
    pub leases: Vec<LeaseRow>,
    /// Those leases with a decided upload.
    pub decided: Vec<i64>,
    /// Pending updates of each block's current round (stale ones included), by block.
    pub pending: Vec<(usize, Pending)>,
    /// Invite token ids (blake3 of the token) and the key each is bound to.
    pub invites: HashMap<String, String>,
    /// The highest lease id ever issued.
    pub last_lease: i64,
}

impl Core {
    /// The core of a run whose journal holds `from`; every active lease gets at least
    /// `lease_ms` from `now` (a restart's downtime is not charged to the workers).
    ///
    /// A lease of an older version (k <= `max_staleness` behind) is kept as
    /// [`Core::committed`] keeps it: active with no decided upload (a lapsed one may not
    /// deliver, [`Core::lease_open`]), or
    /// delivered into this round (its update is pending here). Closed ones (refused,
    /// void, delivered into an earlier round) are left to the journal, which answers
    /// them the same way.
    pub fn new(rules: Rules, secrets: Secrets, from: Rebuild, now: u64) -> Self {
        let mut blocks: Vec<BlockState> = from
            .blocks
            .iter()
            .map(|(version, wire, progress)| BlockState {
                version: *version,
                wires: BTreeMap::from([(*version, wire.clone())]),
                leases: BTreeMap::new(),
                decided: HashSet::new(),
                pending: Vec::new(),
                last_progress_ms: *progress,
                stalled: false,
                closing: false,
            })
            .collect();
        let mut core = Core {
            rules,
            secrets,
            workers: from.workers,
            blocks: Vec::new(),
            lease_block: HashMap::new(),
            active_of: HashMap::new(),
            vetting: HashSet::new(),
            invites: from.invites,
            next_lease: from.last_lease + 1,
            next_lapse_ms: 0,
            dirty_leases: HashSet::new(),
            dropped_soft: Vec::new(),
            dirty_workers: HashSet::new(),
        };
        let max_staleness = core.rules.max_staleness;
        for (block, version, wire) in from.old_wires {
            if let Some(b) = blocks
                .get_mut(block)
                .filter(|b| version < b.version && b.version - version <= max_staleness)
            {
                b.wires.insert(version, wire);
            }
        }
        let decided: HashSet<i64> = from.decided.into_iter().collect();
        let delivered_here: HashSet<i64> =
            from.pending.iter().filter_map(|(_, p)| p.lease).collect();
        for mut l in from.leases {
            let Some(b) = blocks.get_mut(l.block).filter(|b| {
                l.version <= b.version
                    && b.version - l.version <= max_staleness
                    && b.wire_of(l.version).is_some()
            }) else {
                continue;
            };
            if l.version < b.version {
                let open = l.state == lease_state::ACTIVE && !decided.contains(&l.id);
                let here = decided.contains(&l.id) && delivered_here.contains(&l.id);
                if !open && !here {
                    continue;
                }
            }
            if decided.contains(&l.id) {
                b.decided.insert(l.id);
                // A decision whose lease was left open (journals from before decisions
                // were one transaction): the lease is closed, and the journal learns it.
                if l.state == lease_state::ACTIVE || l.state == lease_state::EXPIRED {
                    l.state = lease_state::REFUSED.into();
                    core.dirty_leases.insert(l.id);
                }
            }
            if l.state == lease_state::ACTIVE {
                l.expires_ms = l.expires_ms.max(now + core.rules.lease_ms);
                core.active_of.insert(l.worker.clone(), l.id);
            }
            core.lease_block.insert(l.id, l.block);
            b.leases.insert(l.id, l);
        }
        for (block, p) in from.pending {
            if let Some(b) = blocks.get_mut(block) {
                b.pending.push(p);
            }
        }
        core.blocks = blocks;
        core
    }
}
