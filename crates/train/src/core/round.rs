//! Uploads and rounds: whether a lease may still deliver, its one decided upload, flags,
//! when a round is ready to close, the commit that opens the next one, and stalls.
//!
//! - **One decided upload per lease**: accepted (delivered) or refused; a refusal
//!   closes the lease and the slot is re-leased with a fresh seed.
//! - **Round close**: block b's round closes when its quorum of accepted updates is in,
//!   or `round_timeout_ms` after its first update with whatever has arrived, whichever
//!   comes first. Stale updates accepted into the round count toward its quorum, and
//!   the first of its updates, stale or not, starts its deadline.
//! - **Stale rule** (`max_staleness` K): an update computed from version v-k joins the
//!   block's current round v, and is merged there, when k <= K; k > K is refused as
//!   stale. With K = 0 an update is merged only into the version it was computed from.
//!   A commit keeps the leases of the versions still within K of the new one that are
//!   active with nothing decided: they stay current ([`Core::lease`]),
//!   heartbeats keep them wanted, and their slots stay taken, so they count against
//!   `workers_per_block` and no lease of the new round trains their shards. The others
//!   are no longer current (the journal supersedes the active ones). An older version's
//!   lease that lapses after the commit may not deliver either: its slot is free again,
//!   and a new lease may be training its shard. While a round is
//!   being merged, uploads of every version it would take wait (busy), since the merge
//!   has taken its pending updates already.
//! - **Stalls**: an unfinished block with nothing accepted or committed for
//!   `stall_ms` is stalled (no workers, or every update refused).
use super::*;
use crate::short;
use crate::NodeError;

/// The state a lease in `state` takes when its one upload is refused: void after a failed
/// spot check (never revived), else refused if it was still open; None if it was closed.
pub fn refusal_state(state: &str, void: bool) -> Option<&'static str> {
    match (void, state) {
        (true, _) => Some(lease_state::VOID),
        (false, lease_state::ACTIVE | lease_state::EXPIRED) => Some(lease_state::REFUSED),
        _ => None,
    }
}

/// A block's stall state changed ([`Core::watch_stalls`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StallChange {
    /// Block.
    pub block: usize,
    /// Stalled now (else moving again).
    pub stalled: bool,
    /// Its version.
    pub version: u64,
    /// Time since its last progress, ms.
    pub idle_ms: u64,
}

impl Core {
    /// Whether `key` may upload at all: registered, and not flagged.
    pub fn may_upload(&self, key: &str) -> crate::Result<()> {
        if self.require_registered(key)?.flagged {
            return Err(NodeError::Forbidden(format!(
                "worker {} failed a spot check: its updates are no longer accepted in this run; nothing stored",
                short(key)
            )));
        }
        Ok(())
    }

    /// Whether lease `l` may still deliver: not delivered, refused or void, no upload
    /// decided on it, and of its block's current version or, held open by the core, at
    /// most `max_staleness` versions before it (else stale).
    pub fn lease_open(&self, l: &LeaseRow) -> crate::Result<()> {
        let l = self.lease(l.id).unwrap_or(l);
        match l.state.as_str() {
            lease_state::DELIVERED => {
                return Err(NodeError::Rejected(format!(
                    "lease {} already delivered its update",
                    l.id
                )))
            }
            lease_state::REFUSED | lease_state::VOID => {
                return Err(NodeError::Rejected(format!(
                    "lease {} already had its one upload refused; ask for new work",
                    l.id
                )))
            }
            _ => {}
        }
        // A decision with the lease still open: a crash between recording a refusal and
        // closing the lease. It stays closed.
        if self.is_decided(l.id) {
            return Err(NodeError::Rejected(format!(
                "lease {} already had its one upload decided; ask for new work",
                l.id
            )));
        }
        let b = &self.blocks[l.block];
        let head = b.version;
        let max = self.rules.max_staleness;
        let k = head.saturating_sub(l.version);
        // An older version's lease may deliver only while the core holds it open.
        // Not once lapsed: its slot is free, so a current lease may train the same shard.
        let held =
            k == 0 || (self.lease_block.contains_key(&l.id) && l.state != lease_state::EXPIRED);
        if l.version > head || k > max || !held || l.state == lease_state::SUPERSEDED {
            let rule = match max {
                0 => "max_staleness = 0 merges an update only into its own version".to_string(),
                _ if k <= max => format!(
                    "max_staleness = {max}, but its lease was closed when the block moved on, or lapsed since"
                ),
                _ => format!("max_staleness = {max} merges updates at most {max} versions old"),
            };
            return Err(NodeError::Stale(format!(
                "block {} is at version {head}; this update was computed from version {} ({rule})",
                l.block + 1,
                l.version
            )));
        }
        if b.closing {
            // Not the worker's fault and not final: the merge may fail and reopen the
            // round. Nothing is recorded; the upload is retried.
            return Err(NodeError::Busy(format!(
                "block {}'s round at version {head} is being merged; nothing stored, retry shortly",
                l.block + 1
            )));
        }
        Ok(())
    }

    /// Whether an upload on lease `id` (of a current round) was decided.
    pub fn is_decided(&self, id: i64) -> bool {
        self.lease_block
            .get(&id)
            .is_some_and(|b| self.blocks[*b].decided.contains(&id))
    }

    /// Marks an upload on `id` as being vetted; false if one already is.
    pub fn begin_vetting(&mut self, id: i64) -> bool {
        self.vetting.insert(id)
    }

    /// The upload on `id` was decided (or its vetting died).
    pub fn end_vetting(&mut self, id: i64) {
        self.vetting.remove(&id);
    }

    /// Whether an upload on `id` is being vetted.
    pub fn is_vetting(&self, id: i64) -> bool {
        self.vetting.contains(&id)
    }

    /// The one upload on lease `id` was refused: it is decided, and the lease closes
    /// (`void` after a failed spot check: never revived). Returns the lease's new state
    /// for the journal, or None when it was already closed (or is not current).
    pub fn refuse(&mut self, id: i64, void: bool) -> Option<&'static str> {
        let b = *self.lease_block.get(&id)?;
        self.blocks[b].decided.insert(id);
        let new = refusal_state(&self.blocks[b].leases.get(&id)?.state, void)?;
        self.set_state(id, new);
        self.dirty_leases.remove(&id);
        Some(new)
    }

    /// The one upload on lease `p.lease` was accepted: it waits for its round (the
    /// block's current one, whatever version `p.base` it was computed from).
    pub fn accept(&mut self, block: usize, p: Pending, now: u64) {
        if let Some(id) = p.lease {
            if let Some(b) = self.lease_block.get(&id).copied() {
                self.blocks[b].decided.insert(id);
                self.set_state(id, lease_state::DELIVERED);
                self.dirty_leases.remove(&id);
            }
        }
        let b = &mut self.blocks[block];
        b.last_progress_ms = b.last_progress_ms.max(now);
        b.pending.push(p);
    }

    /// Flags `key` after a failed spot check: no more work or uploads.
    pub fn flag(&mut self, key: &str) {
        if let Some(w) = self.workers.get_mut(key) {
            w.flagged = true;
        }
    }

    /// Whether block `b`'s round is ready to close: its quorum is in, or its deadline
    /// (from the first update) passed with at least one. Stale updates count as any.
    pub fn round_ready(&self, b: usize, now: u64) -> bool {
        let pending = &self.blocks[b].pending;
        let Some(first) = pending.iter().map(|p| p.received_ms).min() else {
            return false;
        };
        pending.len() as u32 >= self.rules.quorum
            || now >= first.saturating_add(self.rules.round_timeout_ms)
    }

    /// Blocks whose rounds are ready to close and not closing yet.
    pub fn ready_rounds(&self, now: u64) -> Vec<usize> {
        (0..self.blocks.len())
            .filter(|&b| self.round_ready(b, now) && !self.blocks[b].closing)
            .collect()
    }

    /// Starts closing block `b`'s round if it is ready and not closing already: until
    /// [`Core::committed`] or [`Core::abort_close`], uploads on it are stale.
    pub fn begin_close(&mut self, b: usize, now: u64) -> bool {
        if !self.round_ready(b, now) || self.blocks[b].closing {
            return false;
        }
        self.blocks[b].closing = true;
        true
    }

    /// The merge of block `b`'s round failed: the round is open again as it was.
    pub fn abort_close(&mut self, b: usize) {
        self.blocks[b].closing = false;
    }

    /// A pending update of block `b` could not be merged (its body was unreadable).
    pub fn drop_pending(&mut self, b: usize, update: i64) {
        self.blocks[b].pending.retain(|p| p.update != update);
    }

    /// Block `b` committed `version` (with `wire` as its download): its pending
    /// updates were merged, and a new round opens. The round's leases are no longer
    /// current (the journal supersedes the active ones), except the active ones (nothing
    /// decided) of versions at most `max_staleness` before the new
    /// one, which stay, with their slots, and may deliver into the new round.
    pub fn committed(&mut self, b: usize, version: u64, wire: &str, now: u64) {
        let max = self.rules.max_staleness;
        let s = &mut self.blocks[b];
        let decided = std::mem::take(&mut s.decided);
        let mut kept = BTreeMap::new();
        for (id, l) in std::mem::take(&mut s.leases) {
            // Active only: a lapsed lease's slot is free for a new lease, so keeping it
            // could merge the same shard twice into one round.
            let open = l.state == lease_state::ACTIVE;
            if open && !decided.contains(&id) && version.saturating_sub(l.version) <= max {
                kept.insert(id, l);
                continue;
            }
            self.lease_block.remove(&id);
            self.vetting.remove(&id);
            // Only a lapse is owed: an active lease dropped here is one the journal's
            // commit supersedes, or one a heartbeat revived from a lapse the journal
            // already holds, which writing it back active would undo.
            if self.dirty_leases.remove(&id) && l.state == lease_state::EXPIRED {
                self.dropped_soft.push((id, l.state.clone(), l.expires_ms));
            }
            if self.active_of.get(&l.worker) == Some(&id) {
                self.active_of.remove(&l.worker);
            }
        }
        let s = &mut self.blocks[b];
        s.leases = kept;
        s.closing = false;
        s.pending.clear();
        s.version = version;
        s.wires.insert(version, wire.to_string());
        s.wires.retain(|&v, _| version.saturating_sub(v) <= max);
        s.last_progress_ms = s.last_progress_ms.max(now);
    }

    /// Marks blocks nobody advances; returns the blocks whose mark changed.
    pub fn watch_stalls(&mut self, now: u64) -> Vec<StallChange> {
        let (rounds, stall_ms) = (self.rules.rounds, self.rules.stall_ms);
        let mut changes = Vec::new();
        for (block, s) in self.blocks.iter_mut().enumerate() {
            let idle_ms = now.saturating_sub(s.last_progress_ms);
            let stalled = s.version < rounds && idle_ms > stall_ms;
            if stalled != s.stalled {
                changes.push(StallChange {
                    block,
                    stalled,
                    version: s.version,
                    idle_ms,
                });
            }
            s.stalled = stalled;
        }
        changes
    }
}
