//! An upload's path, in three steps so that no compute runs under the coordinator's lock:
//!
//! 1. [`Coordinator::admit_update`] (lock held, cheap): registration, flags, the lease
//!    (owned, open, at the block's version), the size, the worker's signed claim and
//!    replays. It hands out a [`VetJob`] that owns everything vetting needs.
//! 2. [`VetJob::run`] (no lock): decode, norm and codec checks, held-out screening and
//!    a spot check, on the caller's thread (the HTTP layer runs it on a bounded pool).
//! 3. [`Coordinator::decide`] (lock held, cheap): the state is checked again (the round
//!    may have closed meanwhile), then the update is accepted or refused.
//!
//! A lease gets one decided upload: a refusal closes it (no retry against the secret
//! screen on the same lease, and at most one receipt per lease), and the slot's next
//! lease is seeded from the coordinator's secret, so an honest retry draws other data.
use std::sync::Arc;

use super::vet::{Refusal, ScreenJob, SpotJob};
use super::*;

/// An honest update moves weights: the RMS of a whole delta below this fraction of the
/// learning rate is an empty update (credit for no work), whatever its claim says.
const MIN_DELTA_RATIO: f64 = 1e-3;

impl Coordinator {
    /// Admits, vets and decides an upload in one call (in-process callers and tests;
    /// the HTTP layer runs the three steps itself so vetting runs without the lock).
    pub fn submit_update(
        &mut self,
        key: &str,
        lease_id: i64,
        body: &[u8],
        loss: Option<f64>,
        claim: Option<(Claim, String)>,
        now: u64,
    ) -> Result<UpdateReply> {
        match self.admit_update(key, lease_id, body.to_vec(), loss, claim, now)? {
            Admitted::Replayed(reply) => Ok(reply),
            Admitted::Vet(job) => {
                let block = job.block();
                let vetted = job.run();
                let mut reply = self.decide(vetted, now)?;
                // The round may be ready now (the server merges off the lock instead).
                if let Err(e) = self.maybe_close(block, now) {
                    tracing::error!("block {}: round not closed: {e}", block + 1);
                }
                reply.block_version = lock(&self.core).version(block);
                Ok(reply)
            }
        }
    }

    /// The cheap checks of an upload, under the lock. A refusal here is recorded (once
    /// per lease, with a receipt) when the lease is the signer's; requests about leases
    /// that are not theirs leave nothing behind.
    pub fn admit_update(
        &mut self,
        key: &str,
        lease_id: i64,
        body: Vec<u8>,
        loss: Option<f64>,
        claim: Option<(Claim, String)>,
        now: u64,
    ) -> Result<Admitted> {
        lock(&self.core).may_upload(key)?;
        let lease = self.owned_lease(key, lease_id).map_err(nothing_stored)?;
        // Busy (503, which clients retry), not a refusal: this is often the same upload
        // re-sent after a client timeout during a long spot check, and a worker drops a
        // delta that was refused.
        if lock(&self.core).is_vetting(lease_id) {
            return Err(NodeError::Busy(format!(
                "an upload on lease {lease_id} is being vetted; wait for its reply (nothing stored)"
            )));
        }
        let body_hash = content_hash(&body);
        // A re-sent upload whose reply was lost: same lease, same bytes. Answer as before.
        if let Some((id, hash)) = self.store.update_of_lease(lease_id)? {
            if hash == body_hash {
                let block_version = lock(&self.core).version(lease.block);
                return Ok(Admitted::Replayed(UpdateReply {
                    update_id: id,
                    block_version,
                }));
            }
        }
        match self.admission(&lease, &body, &body_hash, claim) {
            Ok((claim, screen, spot)) => {
                lock(&self.core).begin_vetting(lease_id);
                let shapes = self.update_shapes(lease.block);
                let lr_steps = self.cfg.optim.lr * lease.steps as f64;
                let rms_bounds = (
                    self.cfg.wire.max_delta_ratio * lr_steps,
                    MIN_DELTA_RATIO * self.cfg.optim.lr,
                );
                let codec = Codec::parse(&self.cfg.wire.codec)
                    .map_err(|e| NodeError::Config(e.to_string()))?;
                Ok(Admitted::Vet(Box::new(VetJob {
                    key: key.to_string(),
                    lease,
                    body,
                    body_hash,
                    claim,
                    loss,
                    shapes,
                    rms_bounds,
                    moment_bound: 2.2 * self.cfg.optim.grad_clip,
                    codec,
                    screen,
                    spot,
                })))
            }
            Err(refused) => {
                let (mut e, claim) = *refused;
                // The coordinator's own trouble (database, corpus) is not the worker's:
                // nothing recorded, the lease stays open, and no internal text goes
                // into a public receipt.
                if !matches!(
                    e,
                    NodeError::Rejected(_) | NodeError::Stale(_) | NodeError::TooLarge(_)
                ) {
                    return Err(e);
                }
                self.refuse_once(
                    &lease,
                    body.len() as u64,
                    &mut e,
                    &body_hash,
                    claim,
                    false,
                    now,
                )?;
                Err(e)
            }
        }
    }

    /// The lease's state and version, the size, the claim and replays; on success the
    /// claim and the screening and spot-check inputs. On failure the error and the claim
    /// (kept for the receipt when it is the worker's own, valid one).
    #[allow(clippy::type_complexity)]
    fn admission(
        &mut self,
        lease: &LeaseRow,
        body: &[u8],
        body_hash: &str,
        claim: Option<(Claim, String)>,
    ) -> std::result::Result<
        ((Claim, String), Option<ScreenJob>, Option<SpotJob>),
        Box<(NodeError, Option<(Claim, String)>)>,
    > {
        if let Err(e) = self.lease_open(lease) {
            // The claim rides along only if it is the worker's own, valid one.
            let valid = claim.filter(|(c, sig)| {
                trust::check_claim(c, sig, &lease.worker, lease, body_hash).is_ok()
            });
            return Err(Box::new((e, valid)));
        }
        let claim = match claim {
            Some((c, sig)) => match trust::check_claim(&c, &sig, &lease.worker, lease, body_hash) {
                Ok(()) => (c, sig),
                Err(e) => return Err(Box::new((NodeError::Rejected(e), None))),
            },
            None => {
                return Err(Box::new((
                    NodeError::Rejected(
                        "no signed claim came with the update (workers must sign what they upload)"
                            .into(),
                    ),
                    None,
                )))
            }
        };
        let fail = |e: NodeError, claim: (Claim, String)| Err(Box::new((e, Some(claim))));
        let limit = update_limit(&self.update_shapes(lease.block)) as usize;
        if body.len() > limit {
            let msg = format!("update of {} bytes; the limit is {limit}", body.len());
            return fail(NodeError::TooLarge(msg), claim);
        }
        match self.store.accepted_with_hash(body_hash) {
            Ok(Some((id, worker))) => {
                let msg = format!(
                    "replay: these exact bytes were already accepted as update {id} from worker {}",
                    short(&worker)
                );
                return fail(NodeError::Rejected(msg), claim);
            }
            Ok(None) => {}
            Err(e) => return fail(e, claim),
        }
        // A stale update is screened as a lone one would be merged: s(k) of its delta on
        // the current weights. Unscaled, a delta computed from an older base often reads
        // as harmful on newer weights (measured: every stale update of a slow-host run
        // was refused so), though the merge never applies it whole.
        let k = lock(&self.core)
            .version(lease.block)
            .saturating_sub(lease.version);
        let scale = crate::merge::staleness_scale(k, self.cfg.training.staleness_exponent);
        let screen = self.screens.get(lease.block).map(|screen| ScreenJob {
            screen: screen.clone(),
            base: self.current[lease.block].clone(),
            before: self.heldout[lease.block],
            threshold: self.screen_threshold(lease.block),
            scale: scale as f32,
            staleness: k,
        });
        let spot = match self.spot_job(lease) {
            Ok(spot) => spot,
            Err(e) => return fail(e, claim),
        };
        Ok((claim, screen, spot))
    }

    /// Whether the lease may still deliver: not delivered, refused or void, no upload
    /// decided on it, and at its block's current version.
    fn lease_open(&self, lease: &LeaseRow) -> Result<()> {
        let open = lock(&self.core).lease_open(lease);
        // The journal has the last word on a decision (the core follows it after the
        // commit, and knows nothing of closed rounds' decisions): it comes before stale.
        if matches!(open, Ok(()) | Err(NodeError::Stale(_)))
            && self.store.lease_decided(lease.id)?
        {
            return Err(NodeError::Rejected(format!(
                "lease {} already had its one upload decided; ask for new work",
                lease.id
            )));
        }
        open
    }

    /// The spot check's inputs when this lease is sampled (a draw keyed with the
    /// coordinator's secret on the lease id, so re-sent bytes do not buy a new draw).
    fn spot_job(&mut self, lease: &LeaseRow) -> Result<Option<SpotJob>> {
        let fraction = self.cfg.trust.spot_check_fraction;
        let secret = blake3::derive_key("blocktrain spot-check sample", &self.identity.secret());
        let own_data = lock(&self.core)
            .worker(&lease.worker)
            .is_some_and(|w| w.own_data);
        let sampled = match (lease.public, own_data) {
            // A check lease of an own-data worker is always recomputed.
            (true, _) => true,
            // Its own-data leases cannot be (the data is not here): screened only.
            (false, true) => false,
            (false, false) => {
                trust::sampled_for_spot_check(&secret, &format!("lease/{}", lease.id), fraction)
            }
        };
        if !sampled {
            return Ok(None);
        }
        let corpus = match &self.corpus {
            Some(c) => c.clone(),
            None => {
                let train = self
                    .model
                    .manifest
                    .plan
                    .dataset
                    .load(blocktrain_model::data::Split::Train)?;
                self.corpus.insert(Arc::new(train)).clone()
            }
        };
        let reply = lock(&self.core).lease_reply(lease);
        Ok(Some(SpotJob {
            manifest: Arc::new(self.model.manifest.clone()),
            wire_path: self.store.blob_path(&reply.weights_hash),
            reply,
            corpus,
        }))
    }

    /// The screen's threshold for block `b`: the configured one until enough honest
    /// updates were accepted, then the honest spread (median + 6 robust deviations of
    /// recent accepted updates' held-out change), never below the configured value and
    /// at most [`trust::SCREEN_CAP`] times it. One absolute number cannot fit every shape and
    /// batch: tiny runs' honest updates move the screen more than large runs' do.
    pub fn screen_threshold(&self, b: usize) -> f64 {
        let recent: Vec<f64> = self.screen_changes[b].iter().copied().collect();
        trust::calibrated_threshold(self.cfg.trust.screen_threshold, &recent)
    }

    /// Forgets an admitted upload whose vetting died (a panicked task), so its lease can
    /// take an upload again.
    pub fn abandon_vetting(&mut self, lease: i64) {
        lock(&self.core).end_vetting(lease);
    }

    /// Decides a vetted upload under the lock. The lease is checked again first: the
    /// round may have closed, or another upload on the lease been decided, while it was
    /// vetted.
    pub fn decide(&mut self, vetted: Vetted, now: u64) -> Result<UpdateReply> {
        let Vetted { job, outcome } = vetted;
        lock(&self.core).end_vetting(job.lease.id);
        let lease = self
            .find_lease(job.lease.id)?
            .ok_or_else(|| NodeError::NotFound(format!("lease {}", job.lease.id)))?;
        // A failed spot check flags the worker whatever became of the round meanwhile.
        if let Err(Refusal::Flagged(reason)) = &outcome {
            self.store.flag_worker(&job.key, reason)?;
            lock(&self.core).flag(&job.key);
        }
        // Decided while this one was vetted: the worker was flagged (another lease's
        // spot check), or the same bytes were accepted on another lease.
        let flagged = lock(&self.core).worker(&job.key).is_some_and(|w| w.flagged);
        let recheck = if flagged && !matches!(outcome, Err(Refusal::Flagged(_))) {
            Some(format!(
                "worker {} failed a spot check while this update was vetted",
                short(&job.key)
            ))
        } else {
            self.store
                .accepted_with_hash(&job.body_hash)?
                .map(|(id, worker)| {
                    format!(
                    "replay: these exact bytes were already accepted as update {id} from worker {}",
                    short(&worker)
                )
                })
        };
        let outcome = match (recheck, outcome) {
            (Some(reason), Ok(_)) => Err(Refusal::Refused(reason)),
            (_, outcome) => outcome,
        };
        if let Some((id, hash)) = self.store.update_of_lease(lease.id)? {
            if hash == job.body_hash {
                let block_version = lock(&self.core).version(lease.block);
                return Ok(UpdateReply {
                    update_id: id,
                    block_version,
                });
            }
        }
        if let Err(mut e) = self.lease_open(&lease) {
            // A round being merged: nothing recorded, the lease stays open, and the
            // upload is retried (stale after the commit, or taken if the merge failed).
            if matches!(e, NodeError::Busy(_)) {
                return Err(e);
            }
            self.refuse_once(
                &lease,
                job.body.len() as u64,
                &mut e,
                &job.body_hash,
                Some(job.claim),
                false,
                now,
            )?;
            return Err(e);
        }
        // Versions between its base and the round it joins (0 unless max_staleness > 0;
        // the lease was just found open, so at most max_staleness).
        let staleness = lock(&self.core)
            .version(lease.block)
            .saturating_sub(lease.version);
        // A round committed while this upload was vetted: its screen judged s(k) of the
        // delta on weights it would no longer be merged into, so neither its pass nor its
        // refusal stands. Nothing is recorded and the lease stays open; the retry is
        // screened again at the new k (or refused as stale). A failed spot check stands.
        let spot_failed = matches!(outcome, Err(Refusal::Flagged(_)));
        let rescreen = job.screen.as_ref().filter(|s| s.staleness != staleness);
        if let (Some(screened), false) = (rescreen, spot_failed) {
            return Err(NodeError::Busy(format!(
                "block {} moved from version {} to {} while this update was screened; \
                 nothing stored, retry to have it screened against the current weights",
                lease.block + 1,
                lease.version + screened.staleness,
                lease.version + staleness
            )));
        }
        let verdict = match outcome {
            Ok(v) => v,
            Err(refusal) => {
                let (reason, flagged) = match refusal {
                    Refusal::Refused(reason) => (reason, false),
                    // Flagged above; the lease is also void (never revived).
                    Refusal::Flagged(reason) => (reason, true),
                };
                let mut e = NodeError::Rejected(reason);
                let bytes = job.body.len() as u64;
                let claim = Some(job.claim);
                self.refuse_once(&lease, bytes, &mut e, &job.body_hash, claim, flagged, now)?;
                return Err(e);
            }
        };
        let hash = self.store.put_blob(&job.body)?;
        let pending_hash = hash.clone();
        let (c, sig) = job.claim;
        let json = serde_json::to_string(&c).expect("claims serialise");
        // The row, its lease delivered, its bytes, its claim and its screening: one
        // transaction, and the core follows once the journal holds it.
        let id = self.store.accept_update(
            &NewUpdate {
                lease: Some(lease.id),
                worker: &job.key,
                block: Some(lease.block),
                version: Some(lease.version),
                bytes: job.body.len() as u64,
                hash: Some(hash),
                steps: Some(lease.steps),
                loss: job.loss,
                state: update_state::PENDING,
                reason: None,
                staleness,
            },
            (&json, &sig),
            verdict.heldout,
            now,
        )?;
        if let Some((before, after)) = verdict.heldout {
            self.note_screen_change(lease.block, after - before);
        }
        {
            let mut core = lock(&self.core);
            let pending = crate::core::Pending {
                update: id,
                lease: Some(lease.id),
                hash: pending_hash,
                steps: lease.steps,
                received_ms: now,
                base: lease.version,
            };
            core.accept(lease.block, pending, now);
            core.seen(&job.key, now);
        }
        let block_version = lock(&self.core).version(lease.block);
        Ok(UpdateReply {
            update_id: id,
            block_version,
        })
    }

    /// Remembers an accepted update's held-out change (the screen's calibration).
    pub(super) fn note_screen_change(&mut self, block: usize, change: f64) {
        let recent = &mut self.screen_changes[block];
        if recent.len() == SCREEN_CALIBRATION_WINDOW {
            recent.pop_front();
        }
        recent.push_back(change);
    }

    /// Records a refusal of the signer's own lease, once per lease: an update row with
    /// its reason, the claim and a receipt, and the lease closed (its slot is re-leased
    /// with a fresh seed). Further refusals on that lease are answered, not recorded, so
    /// no one can grow the ledger faster than leases are issued.
    #[allow(clippy::too_many_arguments)]
    fn refuse_once(
        &mut self,
        lease: &LeaseRow,
        bytes: u64,
        e: &mut NodeError,
        body_hash: &str,
        claim: Option<(Claim, String)>,
        void: bool,
        now: u64,
    ) -> Result<()> {
        let decided =
            lock(&self.core).is_decided(lease.id) || self.store.lease_decided(lease.id)?;
        if decided {
            *e = nothing_stored(std::mem::replace(e, NodeError::Config(String::new())));
            return Ok(());
        }
        let key = lease.worker.clone();
        let reason = e.to_string();
        // The lease closes with its refusal, in the same transaction; the core follows
        // once the journal holds it.
        let fresh = self.find_lease(lease.id)?.unwrap_or_else(|| lease.clone());
        let state = crate::core::refusal_state(&fresh.state, void);
        self.reject(
            &key,
            Some(lease.id),
            bytes,
            &reason,
            Some(body_hash),
            claim,
            state,
            now,
        )?;
        lock(&self.core).refuse(lease.id, void);
        Ok(())
    }
}

/// Accepted updates the screen's calibration looks back on, per block.
pub(super) const SCREEN_CALIBRATION_WINDOW: usize = 32;

/// The same error, saying that nothing was recorded for it (a worker's audit expects a
/// receipt for every refusal that does not say so).
fn nothing_stored(e: NodeError) -> NodeError {
    let add = |m: String| format!("{m}; nothing stored");
    match e {
        NodeError::Rejected(m) => NodeError::Rejected(add(m)),
        NodeError::Stale(m) => NodeError::Stale(add(m)),
        NodeError::NotFound(m) => NodeError::NotFound(add(m)),
        NodeError::Forbidden(m) => NodeError::Forbidden(add(m)),
        NodeError::TooLarge(m) => NodeError::TooLarge(add(m)),
        other => other,
    }
}
