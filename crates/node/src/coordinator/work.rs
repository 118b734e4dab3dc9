//! Joining and leasing: registration, work requests, heartbeats, checkpoint downloads.

use super::*;

impl Coordinator {
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
        if let Some(token) = invite.filter(|_| !by_secret) {
            // The first key to use an invite owns it: a barred operator cannot return
            // under a new key with the same token.
            let token_id = blake3::hash(token.as_bytes()).to_hex().to_string();
            if let Some(owner) = self.store.claim_invite(&token_id, key)? {
                return Err(NodeError::Forbidden(format!(
                    "this invite belongs to worker {}; ask the operator for your own",
                    short(&owner)
                )));
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
        self.watch_stalls(now)?;
        for path in std::mem::take(&mut self.doomed.0) {
            let _ = std::fs::remove_file(path);
        }
        self.doomed.0 = std::mem::take(&mut self.doomed.1);
        for block in 0..self.cfg.blocks {
            if let Err(e) = self.maybe_close(block, now) {
                tracing::error!("block {}: round not closed: {e}", block + 1);
            }
        }
        Ok(())
    }

    /// How long a block may go without an accepted update or a commit before it counts
    /// as stalled: three times the longer of the round's deadline and a lease's life.
    pub fn stall_ms(&self) -> u64 {
        let f = &self.cfg.faults;
        (3.0 * f.round_timeout_secs.max(f.lease_secs) * 1000.0) as u64
    }

    /// Marks blocks that nobody advances (at most once a second), and says so in the
    /// log when a block stalls or recovers.
    fn watch_stalls(&mut self, now: u64) -> Result<()> {
        if now < self.stalled.1 + 1000 {
            return Ok(());
        }
        self.stalled.1 = now;
        let rounds = self.cfg.training.rounds;
        for head in self.store.heads()? {
            let b = head.block;
            let idle = now.saturating_sub(self.store.last_progress_ms(b)?);
            let stalled = head.version < rounds && idle > self.stall_ms();
            if stalled && !self.stalled.0[b] {
                tracing::warn!(
                    "block {} is stalled at version {}: nothing accepted or committed for {} s (no workers, or every update refused; see /v1/status recent)",
                    b + 1,
                    head.version,
                    idle / 1000
                );
            } else if !stalled && self.stalled.0[b] {
                tracing::info!("block {} is moving again (version {})", b + 1, head.version);
            }
            self.stalled.0[b] = stalled;
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
        // Lapsed leases free their slots here (one indexed UPDATE); rounds close at their
        // quorum when an update is decided, and at their deadline on the ticker, so a work
        // request does not walk every block.
        let max_lease = (self.cfg.faults.max_lease_secs * 1000.0) as u64;
        self.store.expire_leases(now, max_lease)?;
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
        // issued: a lapsed lease does not change what the honest worker who takes the
        // slot next computes (a late upload of the lapsed one still matches). After a
        // refusal the slot is re-seeded from the coordinator's secret: an honest update
        // a false positive refused would otherwise be recomputed byte for byte by the
        // next worker and refused again, and no worker can choose its draws.
        let refusals = self.store.refusals_in_slot(block, version, slot)?;
        let seed = if refusals == 0 {
            seed_of(self.cfg.seed, block, version, slot)
        } else {
            let secret = blake3::derive_key("blocktrain lease reseed", &self.identity.secret());
            let h = blake3::keyed_hash(
                &secret,
                format!("{block}/{version}/{slot}/{refusals}").as_bytes(),
            );
            u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
        };
        let expires = now + self.lease_ms();
        // A worker with its own data trains a keyed sample of its leases (the spot-check
        // fraction) on the run's shard instead, and each of those is recomputed: its own
        // data does not buy it immunity from spot checks. It learns which only when it
        // takes the lease, so a cheat could be honest on exactly these; its own-data
        // updates are checked by the held-out screen alone (recomputing them would need
        // data that never leaves its host).
        let public = self.store.has_own_data(key)? && {
            let secret = blake3::derive_key("blocktrain check lease", &self.identity.secret());
            trust::sampled_for_spot_check(
                &secret,
                &format!("{block}/{version}/{slot}/{seed}/{key}"),
                self.cfg.trust.spot_check_fraction,
            )
        };
        let id = self
            .store
            .insert_lease(key, block, version, slot, steps, seed, now, expires, public)?;
        let lease = self.store.lease(id)?.expect("just inserted");
        Ok(WorkReply::Lease(self.lease_reply(&lease, &heads[block])))
    }

    /// Rough memory to train block `b`: weights, gradients and two AdamW moments (16 B
    /// per parameter), activations kept for backward (~40 B per width x layer x token of
    /// a batch, plus the logits), and the corpus and runtime (~256 MB).
    pub(super) fn train_memory(&self, b: usize) -> u64 {
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

    pub(super) fn lease_ms(&self) -> u64 {
        (self.cfg.faults.lease_secs * 1000.0) as u64
    }

    pub(super) fn lease_reply(&self, l: &crate::store::LeaseRow, head: &BlockHead) -> Lease {
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
            public_shard: l.public,
        }
    }

    /// Renews a lease; false when the worker should stop (its round moved on, its
    /// lease was refused or voided, it was flagged, or its lapsed lease's slot went to
    /// another worker).
    pub fn heartbeat(&mut self, key: &str, lease: i64, now: u64) -> Result<bool> {
        self.require_registered(key)?;
        let l = self.owned_lease(key, lease)?;
        self.store.touch_worker(key, None, now)?;
        if self.store.is_flagged(key)? {
            return Ok(false);
        }
        let head_version = self.store.heads()?[l.block].version;
        if l.version != head_version {
            return Ok(false);
        }
        match l.state.as_str() {
            lease_state::ACTIVE => {}
            // A lapsed lease comes back only to a slot nobody else took since, within
            // the round's cap, and never past its longest life.
            lease_state::EXPIRED => {
                let max_lease = (self.cfg.faults.max_lease_secs * 1000.0) as u64;
                let cap = self.cfg.training.workers_per_block;
                let (active, _) = self.store.round_leases(l.block, l.version)?;
                let pending = self.store.pending(l.block, l.version)?.len() as u32;
                let taken = self.store.used_slots(l.block, l.version)?.contains(&l.slot);
                if taken
                    || active + pending >= cap
                    || self.store.active_lease_of(key)?.is_some()
                    || now >= self.store.lease_issued_ms(lease)? + max_lease
                {
                    return Ok(false);
                }
                self.store.set_lease_state(lease, lease_state::ACTIVE)?;
            }
            _ => return Ok(false),
        }
        self.store.renew_lease(lease, now + self.lease_ms())?;
        Ok(true)
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
}
