//! Joining and leasing: registration, work requests, heartbeats, lapses.
//!
//! - **Assignment**: a worker gets the unfinished block with the fewest workers in its
//!   current round (active leases + delivered updates), preferring the block it had
//!   last (its checkpoint is cached), then the block furthest behind. A block takes at
//!   most `workers_per_block` per round; when all are full the worker is told to wait.
//!   An open lease of an older version (`max_staleness`) counts, and keeps its slot:
//!   its update would join this round, so the block is never over-leased.
//!   A block whose estimated training memory exceeds what the worker reports free is
//!   never assigned to it; a worker too small for every block is refused, saying so.
//! - **Local steps**: H, or with `round_seconds` set and a measured step rate,
//!   rate x round_seconds clamped to [H/4, 4H].
//! - **Leases** lapse `lease_ms` after the last heartbeat (or `max_lease_ms` after
//!   issue); a lapsed lease frees its slot, so the block is re-leased to the next worker
//!   that asks. A lapsed lease comes back to a heartbeat only while its slot is free.
use blocktrain_protocol::wire::{join_proof_matches, RegisterRequest, WorkerInfo, WIRE_VERSION};

use super::*;
use crate::short;
use crate::NodeError;

/// The answer to a work request.
#[derive(Clone, Debug, PartialEq)]
pub enum Work {
    /// Train this lease (`true`: issued now, to be journaled before the reply).
    Lease(LeaseRow, bool),
    /// A lease would be issued, and the caller asked not to issue one (the server's fast
    /// path answers from memory only what writes nothing; it asks again with the lock
    /// that journals).
    WouldIssue,
    /// Every block has its workers for this round.
    Wait,
    /// The run has finished.
    Done,
}

/// The answer to a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Beat {
    /// Keep training (`true`) or stop (`false`).
    Wanted(bool),
    /// Not a lease of a current round: the journal knows whether it exists and whose it
    /// is (its round closed, so the answer is at best `false`).
    NotCurrent,
}

/// What a registration changed that the journal must hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Registered {
    /// The invite token id (blake3 of the token) this key now owns, if it used one.
    pub invite: Option<String>,
}

impl Core {
    /// Whether `key` may register (wire version, allowlist, join secret or invite);
    /// changes nothing ([`Core::registered`] does, once the journal holds it).
    pub fn admit(&self, key: &str, req: &RegisterRequest) -> crate::Result<Registered> {
        if req.info.wire_version != WIRE_VERSION {
            return Err(NodeError::Rejected(format!(
                "worker speaks wire version {}, this coordinator {WIRE_VERSION}: use matching builds",
                req.info.wire_version
            )));
        }
        let auth = &self.rules.admission;
        if !auth.allow.is_empty() && !auth.allow.iter().any(|k| k == key) {
            return Err(NodeError::Forbidden(format!(
                "key {} is not on this run's allowlist",
                short(key)
            )));
        }
        let proves = |secret: &str| {
            req.join_proof
                .as_deref()
                .is_some_and(|given| join_proof_matches(secret, key, given))
        };
        let by_secret = auth.join_secret.as_deref().is_some_and(proves);
        let invite = auth.invites.iter().find(|t| proves(t));
        let needs_proof = auth.join_secret.is_some() || !auth.invites.is_empty();
        if needs_proof && !by_secret && invite.is_none() {
            return Err(NodeError::Forbidden(
                "this run needs its join secret or an invite (worker --join-secret), and the one given is missing or wrong".into(),
            ));
        }
        // Whether a worker trains on its own data decides how its leases are checked:
        // it is fixed at first registration (a key that could drop it before an upload
        // would skip its spot checks).
        if let Some(w) = self.workers.get(key) {
            if w.own_data != req.info.data.is_some() {
                return Err(NodeError::Rejected(format!(
                    "worker {} registered {} its own data; a key cannot change that: use a new key",
                    short(key),
                    if w.own_data { "with" } else { "without" }
                )));
            }
        }
        let mut claimed = None;
        if let Some(token) = invite.filter(|_| !by_secret) {
            // The first key to use an invite owns it: a barred operator cannot return
            // under a new key with the same token.
            let token_id = blake3::hash(token.as_bytes()).to_hex().to_string();
            match self.invites.get(&token_id) {
                Some(owner) if owner != key => {
                    return Err(NodeError::Forbidden(format!(
                        "this invite belongs to worker {}; ask the operator for your own",
                        short(owner)
                    )))
                }
                Some(_) => {}
                None => claimed = Some(token_id),
            }
        }
        Ok(Registered { invite: claimed })
    }

    /// Whether `key` may announce a block server: a registered worker that is not
    /// flagged, or a key that passes the run's allowlist and join secret as a
    /// registration would. Invites are for workers: an invited operator registers first.
    pub fn may_announce(&self, key: &str, join_proof: Option<&str>) -> crate::Result<()> {
        if let Some(w) = self.workers.get(key) {
            return match w.flagged {
                true => Err(NodeError::Forbidden(format!(
                    "key {} is flagged on this run and may not announce servers",
                    short(key)
                ))),
                false => Ok(()),
            };
        }
        let auth = &self.rules.admission;
        if !auth.allow.is_empty() && !auth.allow.iter().any(|k| k == key) {
            return Err(NodeError::Forbidden(format!(
                "key {} is not on this run's allowlist",
                short(key)
            )));
        }
        match &auth.join_secret {
            Some(secret) if !join_proof.is_some_and(|p| join_proof_matches(secret, key, p)) => {
                Err(NodeError::Forbidden(
                    "announcing a server on this run needs its join secret (serve --join-secret-file), and the proof given is missing or wrong".into(),
                ))
            }
            None if !auth.invites.is_empty() => Err(NodeError::Forbidden(
                "this run admits by invite: register the key as a worker first, then announce".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Records an admitted registration ([`Core::admit`]) and what the worker reported.
    pub fn registered(&mut self, key: &str, info: &WorkerInfo, reg: &Registered, now: u64) {
        if let Some(token) = &reg.invite {
            self.invites.insert(token.clone(), key.to_string());
        }
        let w = self.workers.entry(key.to_string()).or_default();
        w.own_data = info.data.is_some();
        if info.step_rate.is_some() {
            w.step_rate = info.step_rate;
        }
        w.last_seen_ms = w.last_seen_ms.max(now);
    }

    /// Takes back lease `id`, issued by [`Core::work`] but not journaled (the journal
    /// failed; its reply never went out).
    pub fn unissue(&mut self, id: i64) {
        let Some(b) = self.lease_block.remove(&id) else {
            return;
        };
        if let Some(l) = self.blocks[b].leases.remove(&id) {
            if self.active_of.get(&l.worker) == Some(&id) {
                self.active_of.remove(&l.worker);
            }
        }
    }

    /// Records contact from `key` (soft state).
    pub fn seen(&mut self, key: &str, now: u64) {
        self.touch(key, None, now);
    }

    pub(super) fn require_registered(&self, key: &str) -> crate::Result<&WorkerState> {
        self.workers.get(key).ok_or_else(|| {
            NodeError::Unauthenticated(format!(
                "unknown worker {}: register first (POST /v1/register)",
                short(key)
            ))
        })
    }

    /// Lapses active leases past their deadline (or their longest life); returns how
    /// many. Cheap when nothing is due: it scans only once the earliest deadline passed.
    pub fn lapse(&mut self, now: u64) -> usize {
        if now < self.next_lapse_ms {
            return 0;
        }
        let max = self.rules.max_lease_ms;
        let mut due = Vec::new();
        let mut next = u64::MAX;
        for l in self.blocks.iter().flat_map(|b| b.leases.values()) {
            if l.state != lease_state::ACTIVE {
                continue;
            }
            let deadline = l.expires_ms.min(l.issued_ms.saturating_add(max));
            if deadline <= now {
                due.push(l.id);
            } else {
                next = next.min(deadline);
            }
        }
        for &id in &due {
            self.set_state(id, lease_state::EXPIRED);
            self.dirty_leases.insert(id);
        }
        self.next_lapse_ms = next;
        due.len()
    }

    /// Hands the worker a lease, tells it to wait, or that the run is done. With
    /// `issue` false nothing that needs the journal happens: a new lease is answered
    /// [`Work::WouldIssue`].
    pub fn work(
        &mut self,
        key: &str,
        info: &WorkerInfo,
        now: u64,
        issue: bool,
    ) -> crate::Result<Work> {
        let w = self.require_registered(key)?;
        if w.flagged {
            return Err(NodeError::Forbidden(format!(
                "worker {} failed a spot check: it gets no more work in this run",
                short(key)
            )));
        }
        let (rate, last_block, own_data) = (w.step_rate, w.last_block, w.own_data);
        self.touch(key, info.step_rate, now);
        self.lapse(now);
        // A retried request (the reply was lost) gets the lease it already holds.
        if let Some(l) = self.active_of.get(key).and_then(|id| self.lease(*id)) {
            return Ok(Work::Lease(l.clone(), false));
        }
        if self.done() {
            return Ok(Work::Done);
        }
        let r = &self.rules;
        let cap = r.workers_per_block;
        // Blocks this worker can hold in its memory (0 = it did not say).
        let fits = |b: usize| info.memory_bytes == 0 || r.train_memory[b] <= info.memory_bytes;
        if !(0..r.blocks).any(fits) {
            let need = r.train_memory.iter().min().copied().unwrap_or(0);
            return Err(NodeError::Rejected(format!(
                "this worker reports {} MB of free memory; training the smallest block needs about {} MB",
                info.memory_bytes >> 20,
                need >> 20
            )));
        }
        let best = self
            .blocks
            .iter()
            .enumerate()
            .filter(|(b, s)| s.version < r.rounds && fits(*b) && s.busy() < cap && !s.closing)
            .min_by_key(|(b, s)| (s.busy(), last_block != Some(*b), s.version, *b))
            .map(|(b, _)| b);
        let Some(block) = best else {
            return Ok(Work::Wait);
        };
        if !issue {
            return Ok(Work::WouldIssue);
        }
        let steps = match info.step_rate.or(rate) {
            Some(rate) if r.round_seconds > 0.0 && rate > 0.0 => ((rate * r.round_seconds).round()
                as i64)
                .clamp((r.local_steps / 4).max(1), r.local_steps * 4),
            _ => r.local_steps,
        };
        let s = &self.blocks[block];
        let version = s.version;
        let issued = s.counts().1;
        let slot = (0..cap)
            .find(|&slot| !s.slot_taken(slot))
            .unwrap_or(issued % cap);
        // A lease's randomness follows its round and slot, not how many leases were
        // issued: a lapsed lease does not change what the honest worker who takes the
        // slot next computes (a late upload of the lapsed one still matches). After a
        // refusal the slot is re-seeded from the coordinator's secret: an honest update
        // a false positive refused would otherwise be recomputed byte for byte by the
        // next worker and refused again, and no worker can choose its draws.
        let refusals = s.refusals(slot);
        let seed = match refusals {
            0 => seed_of(r.run_seed, block, version, slot),
            n => {
                let h = blake3::keyed_hash(
                    &self.secrets.reseed,
                    format!("{block}/{version}/{slot}/{n}").as_bytes(),
                );
                u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
            }
        };
        // A worker with its own data trains a keyed sample of its leases (the spot-check
        // fraction) on the run's shard instead, and each of those is recomputed: its own
        // data does not buy it immunity from spot checks. It learns which only when it
        // takes the lease, so a cheat could be honest on exactly these; its own-data
        // updates are checked by the held-out screen alone (recomputing them would need
        // data that never leaves its host).
        let public = own_data
            && sampled(
                &self.secrets.check_lease,
                &format!("{block}/{version}/{slot}/{seed}/{key}"),
                r.spot_check_fraction,
            );
        let lease = LeaseRow {
            id: self.next_lease,
            worker: key.to_string(),
            block,
            version,
            slot,
            steps,
            seed,
            issued_ms: now,
            expires_ms: now + r.lease_ms,
            state: lease_state::ACTIVE.into(),
            public,
        };
        self.next_lease += 1;
        self.next_lapse_ms = self.next_lapse_ms.min(lease.expires_ms);
        self.lease_block.insert(lease.id, block);
        self.active_of.insert(key.to_string(), lease.id);
        self.blocks[block].leases.insert(lease.id, lease.clone());
        if let Some(w) = self.workers.get_mut(key) {
            w.last_block = Some(block);
        }
        Ok(Work::Lease(lease, true))
    }

    /// Renews a lease; `false` when the worker should stop (its lease was refused or
    /// voided, it was flagged, or its lapsed lease's slot went to another worker).
    pub fn heartbeat(&mut self, key: &str, id: i64, now: u64) -> crate::Result<Beat> {
        let flagged = self.require_registered(key)?.flagged;
        self.touch(key, None, now);
        let Some(l) = self.lease(id) else {
            return Ok(Beat::NotCurrent);
        };
        if l.worker != key {
            return Err(NodeError::Forbidden(format!(
                "lease {id} belongs to another worker"
            )));
        }
        if flagged {
            return Ok(Beat::Wanted(false));
        }
        match l.state.as_str() {
            lease_state::ACTIVE => {}
            // A lapsed lease comes back only to a slot nobody else took since, within
            // the round's cap, and never past its longest life; and only in its own
            // version's round: one kept past a commit may not deliver once it lapsed
            // (`lease_open`), and the journal's rebuild keeps it only while active.
            lease_state::EXPIRED => {
                let b = &self.blocks[l.block];
                if l.version < b.version
                    || b.slot_taken(l.slot)
                    || b.busy() >= self.rules.workers_per_block
                    || self.active_of.contains_key(key)
                    || now >= l.issued_ms + self.rules.max_lease_ms
                {
                    return Ok(Beat::Wanted(false));
                }
                self.set_state(id, lease_state::ACTIVE);
            }
            _ => return Ok(Beat::Wanted(false)),
        }
        let until = now + self.rules.lease_ms;
        let max_ms = self.rules.max_lease_ms;
        if let Some(l) = self.lease_mut(id) {
            l.expires_ms = until;
            // A revived lease is active again: the next lapse scan must see it.
            let deadline = until.min(l.issued_ms.saturating_add(max_ms));
            self.next_lapse_ms = self.next_lapse_ms.min(deadline);
        }
        self.dirty_leases.insert(id);
        Ok(Beat::Wanted(true))
    }
}

/// Whether draw `what` falls in a keyed sample of `fraction`: reproducible for the
/// coordinator, but no worker can tell in advance which of its leases or updates it
/// covers (and cheat only on the others).
pub fn sampled(secret: &[u8; 32], what: &str, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    if fraction >= 1.0 {
        return true;
    }
    let h = blake3::keyed_hash(secret, format!("spot-check/{what}").as_bytes());
    let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
    (x as f64 / u64::MAX as f64) < fraction
}
