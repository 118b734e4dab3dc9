//! What a worker does with the coordinator's answer to an upload: journal it when the
//! answer promises a receipt (the audit then looks for it), and back off after a
//! refusal. Kept apart from the lease loop in `mod.rs`, which calls these once per
//! upload: which answers are journaled is what the audit (`audit.rs`) checks against.
use std::time::Duration;

use blocktrain_protocol::wire::{Lease, UpdateReply};

use super::{Session, Upload, WARN_AFTER};
use crate::{now_ms, NodeError, Result};

/// Whether the coordinator issues a receipt for this refusal of an upload: it does for
/// every refusal of an authenticated upload it read. Not for 401/403 (the key is not
/// trusted, or is barred: no receipt, by design) nor for a body it says it did not store.
fn receipted_refusal(e: &NodeError) -> bool {
    matches!(
        e,
        NodeError::Stale(_)
            | NodeError::Rejected(_)
            | NodeError::TooLarge(_)
            | NodeError::NotFound(_)
    ) && !e.to_string().contains("nothing stored")
}

impl Session<'_> {
    /// The wait after the `n`th refused update in a row, logged with why this worker
    /// does not give up.
    pub(super) fn back_off(&mut self, n: u32, e: &NodeError) -> Duration {
        let me = &self.me;
        let wait = self.ctl.backoff.wait(n, &mut self.rng);
        eprintln!(
            "[worker {me}] update refused ({n} in a row): {e}. Backing off {:.1} s before \
             asking for new work: an honest update can be refused too (e.g. by the held-out \
             screen), so only a definitive refusal (403: barred) ends this worker",
            wait.as_secs_f64()
        );
        if n >= WARN_AFTER {
            eprintln!(
                "[worker {me}] WARNING: {n} updates in a row refused. This looks like a \
                 broken setup rather than bad luck: check --data, the device, and that this \
                 build matches the coordinator's. Still trying, at least every {:.0} s",
                self.ctl.backoff.cap.as_secs_f64()
            );
        }
        wait
    }

    /// Journals an upload the coordinator answered, when that answer promises a
    /// receipt (the audit then looks for it).
    pub(super) fn note_upload(
        &mut self,
        lease: &Lease,
        body: &[u8],
        sent: &Result<UpdateReply>,
    ) -> Result<()> {
        let (accepted, update_id, block_version, reason) = match sent {
            Ok(r) => {
                self.seen.saw(lease.block as u32, r.block_version);
                (true, Some(r.update_id), Some(r.block_version), None)
            }
            Err(e) if receipted_refusal(e) => (false, None, None, Some(e.to_string())),
            Err(_) => return Ok(()),
        };
        self.record.record(&Upload {
            lease: lease.id,
            block: lease.block as u32,
            base_version: lease.version,
            update_blake3: blocktrain_model::checkpoint::content_hash(body),
            update_id,
            accepted,
            block_version,
            reason,
            time_ms: now_ms(),
        })
    }
}
