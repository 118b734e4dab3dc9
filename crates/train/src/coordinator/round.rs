//! Round close: averaging a round's updates and committing the block's next version, in
//! three steps so that no compute runs under the coordinator's lock:
//!
//! 1. [`Coordinator::begin_merge`] (lock held, cheap): the core says the round is ready
//!    and marks it closing (uploads on it are answered stale from then on, as they would
//!    be a moment later); the job takes the pending updates, the base weights and paths.
//! 2. [`MergeJob::run`] (no lock): read and decode the bodies, average them (weighted by
//!    steps, a stale update's weight scaled by s(k) = (1 + k)^-a, k versions between its
//!    base and this round's: [`merge::staleness_scale`]), the outer step, encode and
//!    write the new blobs, the held-out loss.
//! 3. [`Coordinator::finish_merge`] (lock held, cheap): one transaction commits the
//!    version, the core opens the next round, receipts are issued.

use super::*;
use crate::config::Outer;
use crate::merge::MergeRule;
use crate::store::Blobs;

/// A round's merge, with everything it needs and no handle on the coordinator.
pub struct MergeJob {
    block: usize,
    head: BlockHead,
    pending: Vec<crate::core::Pending>,
    base: Arc<Arrays>,
    shapes: Shapes,
    blobs: Blobs,
    outer: Outer,
    rule: MergeRule,
    cfg: RunConfig,
    screen: Option<Arc<Mutex<crate::verify::Screen>>>,
}

/// What a merge produced.
pub struct Merged {
    block: usize,
    base_version: u64,
    /// Pending updates whose bodies could not be read back, with why.
    unreadable: Vec<(i64, String)>,
    /// The new version (None: nothing was readable), or why it failed.
    version: Result<Option<NewVersion>>,
}

struct NewVersion {
    head: BlockHead,
    merged: Vec<i64>,
    weights: Arc<Arrays>,
    /// The fp32 encoding of `weights` (the exported model's file).
    bytes: Vec<u8>,
    heldout: Option<Result<f64>>,
}

impl MergeJob {
    /// Reads, averages, steps and writes; holds no lock.
    pub fn run(self) -> Merged {
        let mut unreadable = Vec::new();
        let version = self.merge(&mut unreadable);
        Merged {
            block: self.block,
            base_version: self.head.version,
            unreadable,
            version,
        }
    }

    fn merge(&self, unreadable: &mut Vec<(i64, String)>) -> Result<Option<NewVersion>> {
        let decode = |bytes: Vec<u8>| {
            codec::decode(&bytes, &self.shapes, usize::MAX)
                .map(|(d, _)| d)
                .map_err(|e| NodeError::Config(e.to_string()))
        };
        let mut deltas = Vec::with_capacity(self.pending.len());
        let mut merged = Vec::with_capacity(self.pending.len());
        let exponent = self.cfg.training.staleness_exponent;
        for p in &self.pending {
            // A body that cannot be read back (disk trouble) is rejected, not fatal.
            match self.blobs.get(&p.hash).and_then(decode) {
                Ok(d) => {
                    // Its delta is added to this round's weights (and its moments' delta
                    // to this round's served moments), weighted by s(k).
                    let k = self.head.version.saturating_sub(p.base);
                    deltas.push((d, p.steps, merge::staleness_scale(k, exponent)));
                    merged.push(p);
                }
                Err(e) => {
                    unreadable.push((p.update, format!("stored body unreadable at merge: {e}")))
                }
            }
        }
        if deltas.is_empty() {
            return Ok(None);
        }
        let mean = merge::merge_deltas(&deltas, &self.rule);
        let weight_shapes: Shapes = self
            .shapes
            .iter()
            .filter(|(name, _)| !crate::moments::is_moment(name))
            .map(|(name, s)| (name.clone(), s.clone()))
            .collect();
        let momentum = match &self.head.momentum {
            Some(h) => {
                codec::decode(&self.blobs.get(h)?, &weight_shapes, usize::MAX)
                    .map_err(|e| NodeError::Config(e.to_string()))?
                    .0
            }
            None => Arrays::new(),
        };
        let mut weights = (*self.base).clone();
        let momentum = merge::outer_step(&mut weights, &mean, momentum, &self.outer);
        let bytes = encode_weights(&weights);
        // The moments served next: the ones this round's leases started from (in the
        // file they downloaded) plus the round's mean moment delta.
        let moments = if weight_shapes.len() < self.shapes.len() {
            let served = crate::local_train::decode_checkpoint(&self.blobs.get(&self.head.wire)?)
                .map_err(|e| NodeError::Config(e.to_string()))?;
            let mut next = crate::moments::apply(&crate::moments::split(served).1, &mean);
            let o = &self.cfg.optim;
            crate::moments::project(
                &mut next,
                o.grad_clip,
                crate::moments::kappa(o.beta1, o.beta2),
            );
            next
        } else {
            Arrays::new()
        };
        let wire = encode_wire(&crate::moments::join(weights.clone(), moments), &self.cfg);
        let head = BlockHead {
            block: self.block,
            version: self.head.version + 1,
            weights: self.blobs.put(&bytes)?,
            wire: self.blobs.put(&wire)?,
            momentum: match momentum.is_empty() {
                true => None,
                false => Some(self.blobs.put(&codec::encode(&momentum, Codec::Fp32))?),
            },
            steps: self.head.steps + merged.iter().map(|p| p.steps).sum::<i64>(),
        };
        let heldout = self
            .screen
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).loss(&weights));
        Ok(Some(NewVersion {
            head,
            merged: merged.iter().map(|p| p.update).collect(),
            weights: Arc::new(weights),
            bytes,
            heldout,
        }))
    }
}

impl Coordinator {
    /// Merges block `block`'s round if it is ready (in-process callers; the server runs
    /// the three steps itself so that the merge runs without the lock).
    pub(super) fn maybe_close(&mut self, block: usize, now: u64) -> Result<()> {
        match self.begin_merge(block, now)? {
            Some(job) => self.finish_merge(job.run(), now),
            None => Ok(()),
        }
    }

    /// The merge of block `block`'s round, if it is ready and not already closing.
    pub fn begin_merge(&mut self, block: usize, now: u64) -> Result<Option<MergeJob>> {
        let pending = {
            let mut core = lock(&self.core);
            if !core.begin_close(block, now) {
                return Ok(None);
            }
            core.pending(block).to_vec()
        };
        let job = (|| {
            Ok(MergeJob {
                block,
                head: self.store.heads()?[block].clone(),
                pending,
                base: self.current[block].clone(),
                shapes: self.update_shapes(block),
                blobs: self.store.blobs(),
                outer: self.cfg.outer.clone(),
                rule: self.cfg.outer.merge_rule()?,
                cfg: self.cfg.clone(),
                screen: self.screens.get(block).cloned(),
            })
        })();
        if job.is_err() {
            lock(&self.core).abort_close(block);
        }
        job.map(Some)
    }

    /// Blocks whose rounds are ready to merge.
    pub fn ready_rounds(&self, now: u64) -> Vec<usize> {
        lock(&self.core).ready_rounds(now)
    }

    /// Commits what a merge produced: the version, the core's next round, the exported
    /// model, receipts and the held-out history.
    pub fn finish_merge(&mut self, merged: Merged, now: u64) -> Result<()> {
        let block = merged.block;
        let result = self.commit_merge(merged, now);
        // Whatever failed before the commit, the round opens again (a commit has
        // cleared the mark already); the next tick retries the merge.
        if result.is_err() {
            lock(&self.core).abort_close(block);
        }
        result
    }

    /// The merge given up (its task died): the round opens again.
    pub fn abort_merge(&mut self, block: usize) {
        lock(&self.core).abort_close(block);
    }

    fn commit_merge(&mut self, merged: Merged, now: u64) -> Result<()> {
        let Merged {
            block,
            base_version,
            unreadable,
            version,
        } = merged;
        if lock(&self.core).version(block) != base_version {
            // Cannot happen while the round is marked closing; never commit over another.
            return Err(NodeError::Config(format!(
                "block {}: merge of version {base_version} found the block moved on",
                block + 1
            )));
        }
        for (id, reason) in unreadable {
            tracing::error!("update {id}: {reason}");
            self.store.reject_pending(id, &reason)?;
            lock(&self.core).drop_pending(block, id);
            if let Err(r) = self.merge_receipt(id, None, Some(reason), now) {
                tracing::error!("update {id}: receipt deferred to the next start: {r}");
            }
        }
        let v = match version {
            Ok(Some(v)) => v,
            Ok(None) => {
                lock(&self.core).abort_close(block);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let max_staleness = self.cfg.training.max_staleness;
        self.store
            .commit_version(&v.head, &v.merged, max_staleness, now)?;
        // The version is committed: memory follows it before any bookkeeping that can
        // fail (receipts, held-out history), so a failure there never forks the state.
        lock(&self.core).committed(block, v.head.version, &v.head.wire, now);
        self.current[block] = v.weights;
        // From here on a failure is logged, not returned: the version stands.
        if let Err(e) = self.model.save_weights(block, &v.bytes, v.head.steps) {
            tracing::error!("block {}: model export not written: {e}", block + 1);
        }
        for &id in &v.merged {
            if let Err(e) = self.merge_receipt(id, Some(v.head.version), None, now) {
                tracing::error!("update {id}: receipt deferred to the next start: {e}");
            }
        }
        match v.heldout {
            Some(Ok(loss)) => {
                self.heldout[block] = loss;
                if let Err(e) = self
                    .store
                    .put_version_loss(block, v.head.version, loss, now)
                {
                    tracing::error!("block {}: held-out loss not recorded: {e}", block + 1);
                }
            }
            Some(Err(e)) => {
                tracing::error!("block {}: held-out loss not computed: {e}", block + 1)
            }
            None => {}
        }
        tracing::info!(
            "block {}: version {} -> {} from {} update(s), {} local steps in all",
            block + 1,
            base_version,
            v.head.version,
            v.merged.len(),
            v.head.steps
        );
        let keep = self.cfg.faults.keep_versions;
        if keep > 0 && v.head.version >= keep {
            if let Err(e) = self.store.prune_versions(block, v.head.version + 1 - keep) {
                tracing::error!("block {}: old versions not pruned: {e}", block + 1);
            }
        }
        if let Err(e) = self.drop_merged_bodies(&v.merged) {
            tracing::error!("block {}: merged bodies not dropped: {e}", block + 1);
        }
        Ok(())
    }

    /// Drops merged update bodies nothing else names (identical bodies share a blob): at
    /// once when every commit is durable, else once the group commit has flushed this
    /// one (a power loss could otherwise revert the merge and find the bodies of its
    /// still-pending updates gone).
    fn drop_merged_bodies(&mut self, merged: &[i64]) -> Result<()> {
        for &id in merged {
            let Some((_, _, Some(hash))) = self.store.update_origin(id)? else {
                continue;
            };
            if !self.store.blob_referenced(&hash)? {
                let path = self.store.blob_path(&hash);
                match self.deferred_sync {
                    true => self.doomed.1.push(path),
                    false => {
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
        }
        Ok(())
    }
}
