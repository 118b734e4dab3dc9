//! The run's status for `/v1/status`, `/metrics` and the dashboard.

use super::*;

impl Coordinator {
    /// Held-out loss of every evaluated version, per block: (version, time_ms, loss).
    pub fn heldout_history(&self) -> Result<Vec<Vec<(u64, u64, f64)>>> {
        (0..self.cfg.blocks)
            .map(|b| self.store.version_losses(b))
            .collect()
    }

    /// The run's status (blocks, workers, bytes moved, recent updates).
    pub fn status(&self) -> Result<Status> {
        let traffic: Vec<Traffic> = self.store.traffic()?;
        // What the core knows, copied out first: heartbeats and waits take its lock, and
        // must not wait for the queries below.
        let (live_blocks, live_workers, done) = {
            let core = lock(&self.core);
            let blocks: Vec<(u32, usize, bool)> = (0..self.cfg.blocks)
                .map(|b| {
                    (
                        core.active_leases(b),
                        core.pending(b).len(),
                        core.stalled(b),
                    )
                })
                .collect();
            let workers: HashMap<String, (u64, Option<f64>)> = core
                .workers()
                .map(|(k, w)| (k.clone(), (w.last_seen_ms, w.step_rate)))
                .collect();
            (blocks, workers, core.done())
        };
        let heads = self.store.heads()?;
        let mut blocks = Vec::new();
        for h in &heads {
            blocks.push(BlockStatus {
                block: h.block,
                version: h.version,
                rounds: self.cfg.training.rounds,
                active_leases: live_blocks[h.block].0,
                pending_updates: live_blocks[h.block].1,
                steps: h.steps,
                weights: h.weights.clone(),
                bytes_up: traffic
                    .iter()
                    .filter(|t| t.block == h.block)
                    .map(|t| t.up)
                    .sum(),
                bytes_down: traffic
                    .iter()
                    .filter(|t| t.block == h.block)
                    .map(|t| t.down)
                    .sum(),
                heldout: self.heldout.get(h.block).copied(),
                stalled: live_blocks[h.block].2,
            });
        }
        // Bytes per worker in one pass (the ticker builds this status every 250 ms: a
        // scan of the traffic table per worker would be workers x rows each time).
        let mut per_worker: HashMap<&str, (u64, u64)> = HashMap::new();
        for t in &traffic {
            let e = per_worker.entry(t.worker.as_str()).or_default();
            *e = (e.0 + t.up, e.1 + t.down);
        }
        let workers = self
            .store
            .workers()?
            .into_iter()
            .map(
                |(key, device, step_rate, data_blake3, data_bytes, last_seen_ms)| {
                    // Contact and step rate are soft state: the core's copy is the fresher.
                    let live = live_workers.get(&key);
                    WorkerStatus {
                        bytes_up: per_worker.get(key.as_str()).map_or(0, |b| b.0),
                        bytes_down: per_worker.get(key.as_str()).map_or(0, |b| b.1),
                        step_rate: live.and_then(|w| w.1).or(step_rate),
                        last_seen_ms: live.map_or(last_seen_ms, |w| w.0.max(last_seen_ms)),
                        key,
                        device,
                        data_blake3,
                        data_bytes,
                    }
                },
            )
            .collect();
        Ok(Status {
            done,
            blocks,
            workers,
            updates: self.store.update_counts()?.into_iter().collect(),
            stale_applied: self.store.stale_applied_count()?,
            recent: self.store.recent_updates(20)?,
            bytes_up: traffic.iter().map(|t| t.up).sum(),
            bytes_down: traffic.iter().map(|t| t.down).sum(),
            flagged: self
                .store
                .flagged()?
                .into_iter()
                .map(|(key, failed_checks, last_reason)| FlaggedWorker {
                    key,
                    failed_checks,
                    last_reason,
                })
                .collect(),
        })
    }

    /// Version history of a block (for invariant checks): (version, weights hash).
    pub fn history(&self, block: usize) -> Result<Vec<(u64, String)>> {
        self.store.history(block)
    }
}
