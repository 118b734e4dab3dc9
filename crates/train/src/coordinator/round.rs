//! Round close: averaging a round's updates and committing the block's next version.

use super::*;

impl Coordinator {
    pub(super) fn maybe_close(&mut self, block: usize, now: u64) -> Result<()> {
        let pending = {
            let core = lock(&self.core);
            if !core.round_ready(block, now) {
                return Ok(());
            }
            core.pending(block).to_vec()
        };
        let head = self.store.heads()?[block].clone();
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
                    tracing::error!("update {} unreadable at merge: {e}", p.update);
                    let reason = format!("stored body unreadable at merge: {e}");
                    self.store.reject_pending(p.update, &reason)?;
                    lock(&self.core).drop_pending(block, p.update);
                    if let Err(r) = self.merge_receipt(p.update, None, Some(reason), now) {
                        tracing::error!(
                            "update {}: receipt deferred to the next start: {r}",
                            p.update
                        );
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
        let mut weights = (*self.current[block]).clone();
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
        let ids: Vec<i64> = pending.iter().map(|p| p.update).collect();
        self.store.commit_version(&new_head, &ids, now)?;
        // The version is committed: memory follows it before any bookkeeping that can
        // fail (receipts, held-out history), so a failure there never forks the state.
        lock(&self.core).committed(block, new_head.version, &new_head.wire, now);
        self.current[block] = Arc::new(weights);
        self.model.save_weights(block, &bytes, new_head.steps)?;
        for &id in &ids {
            if let Err(e) = self.merge_receipt(id, Some(new_head.version), None, now) {
                tracing::error!("update {id}: receipt deferred to the next start: {e}");
            }
        }
        if let Some(screen) = self.screens.get(block) {
            let loss = screen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .loss(&self.current[block]);
            match loss {
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
        // Drop merged update bodies nothing else names (identical bodies share a blob):
        // at once when every commit is durable, else once the group commit has flushed
        // this one (a power loss could otherwise revert the merge and find the bodies of
        // its still-pending updates gone).
        for p in &pending {
            if !self.store.blob_referenced(&p.hash)? {
                let path = self.store.blob_path(&p.hash);
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
