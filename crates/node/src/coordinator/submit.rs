//! An upload's path: size, shape and norm checks, the worker's claim, held-out
//! screening and spot checks, then acceptance (or one recorded refusal).

use super::*;

impl Coordinator {
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

    pub(super) fn check_update(
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

    /// The checks beyond shape and size ([`crate::trust`]): the worker's claim, replays,
    /// held-out screening, spot checks. Returns what to record; Err is the reason to
    /// reject.
    pub(super) fn vet(
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
    pub(super) fn screen(
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
    pub(super) fn spot_check(
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

    pub(super) fn recompute(
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
}
