//! Joining and leasing: registration, work requests, heartbeats, checkpoint downloads.

use super::*;
use crate::core::{Beat, Work};

impl Coordinator {
    /// Admits a worker (join secret / allowlist / invite) and records what it reported.
    pub fn register(&mut self, key: &str, req: &RegisterRequest, now: u64) -> Result<RunInfo> {
        let admitted = lock(&self.core).admit(key, req)?;
        if let Some(token) = &admitted.invite {
            // The core saw the invite free; the journal agrees, or says who owns it.
            if let Some(owner) = self.store.claim_invite(token, key)? {
                return Err(NodeError::Forbidden(format!(
                    "this invite belongs to worker {}; ask the operator for your own",
                    short(&owner)
                )));
            }
        }
        self.store.upsert_worker(key, &req.info, now)?;
        lock(&self.core).registered(key, &req.info, &admitted, now);
        Ok(self.run_info())
    }

    /// Lapses leases, writes the core's soft state to the journal, watches for stalls,
    /// and closes rounds that are ready. A block whose merge fails is logged and left
    /// for the next tick; the other blocks go on.
    pub fn tick(&mut self, now: u64) -> Result<()> {
        for block in self.tick_journal(now)? {
            if let Err(e) = self.maybe_close(block, now) {
                tracing::error!("block {}: round not closed: {e}", block + 1);
            }
        }
        Ok(())
    }

    /// [`Coordinator::tick`] without the merges: lapses, stalls, the soft state written,
    /// flushed files deleted; returns the blocks whose rounds are ready to merge (the
    /// server merges them off the lock).
    pub fn tick_journal(&mut self, now: u64) -> Result<Vec<usize>> {
        let ready = {
            let mut core = lock(&self.core);
            core.lapse(now);
            if now >= self.stalls_checked + 1000 {
                self.stalls_checked = now;
                for c in core.watch_stalls(now) {
                    match c.stalled {
                        true => tracing::warn!(
                            "block {} is stalled at version {}: nothing accepted or committed for {} s (no workers, or every update refused; see /v1/status recent)",
                            c.block + 1,
                            c.version,
                            c.idle_ms / 1000
                        ),
                        false => tracing::info!(
                            "block {} is moving again (version {})",
                            c.block + 1,
                            c.version
                        ),
                    }
                }
            }
            core.ready_rounds(now)
        };
        self.flush_soft()?;
        for path in std::mem::take(&mut self.doomed.0) {
            let _ = std::fs::remove_file(path);
        }
        self.doomed.0 = std::mem::take(&mut self.doomed.1);
        Ok(ready)
    }

    /// How long a block may go without an accepted update or a commit before it counts
    /// as stalled: three times the longer of the round's deadline and a lease's life.
    pub fn stall_ms(&self) -> u64 {
        lock(&self.core).rules().stall_ms
    }

    /// Hands the worker a lease, tells it to wait, or that the run is done. A new lease
    /// is journaled before the reply.
    pub fn request_work(&mut self, key: &str, info: &WorkerInfo, now: u64) -> Result<WorkReply> {
        // Lapses are soft state: written before a lease that may reuse a lapsed slot, so
        // a crash cannot bring back two active leases on one slot. One lock from the lapse
        // to the new lease's row: a lapse found in between (by the lock-free fast path of
        // `/v1/work`) would otherwise reach the journal only after the lease reusing it.
        let mut core = lock(&self.core);
        core.lapse(now);
        let soft = core.take_soft();
        if let Err(e) = self.store.write_soft(&soft) {
            core.restore_soft(soft);
            return Err(e);
        }
        match core.work(key, info, now, true)? {
            Work::Lease(lease, issued) => {
                if issued {
                    if let Err(e) = self.store.insert_lease(&lease) {
                        core.unissue(lease.id);
                        let _ = self.store.delete_lease(lease.id);
                        return Err(e);
                    }
                }
                Ok(WorkReply::Lease(core.lease_reply(&lease)))
            }
            Work::Wait | Work::WouldIssue => Ok(WorkReply::Wait { retry_ms: 1000 }),
            Work::Done => Ok(WorkReply::Done),
        }
    }

    /// Renews a lease; false when the worker should stop (its round moved on, its
    /// lease was refused or voided, it was flagged, or its lapsed lease's slot went to
    /// another worker).
    pub fn heartbeat(&mut self, key: &str, lease: i64, now: u64) -> Result<bool> {
        let beat = lock(&self.core).heartbeat(key, lease, now)?;
        match beat {
            Beat::Wanted(wanted) => Ok(wanted),
            // Not of an open round: it exists and is the signer's, or the error says
            // which it is not; either way its round has moved on.
            Beat::NotCurrent => self.owned_lease(key, lease).map(|_| false),
        }
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
