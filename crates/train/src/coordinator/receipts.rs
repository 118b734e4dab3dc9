//! Receipts: every decision about an upload signed into the ledger.

use super::*;

impl Coordinator {
    /// The row of a refused upload (no claim, no receipt): what [`Coordinator::reject`]
    /// builds on; counted against the lease's block when `claimed_key` holds it. Only
    /// authenticated uploads get here: the HTTP layer records nothing before the
    /// signature over the bytes holds.
    pub fn record_rejection(
        &self,
        claimed_key: &str,
        lease: Option<i64>,
        bytes: u64,
        reason: &str,
        now: u64,
    ) -> Result<i64> {
        let row = lease.and_then(|id| self.find_lease(id).ok().flatten());
        let id = self.store.insert_update(
            &NewUpdate {
                lease,
                worker: claimed_key,
                block: row.as_ref().map(|l| l.block),
                version: row.as_ref().map(|l| l.version),
                bytes,
                state: update_state::REJECTED,
                reason: Some(reason.to_string()),
                ..Default::default()
            },
            now,
        )?;
        if let Some(l) = row.as_ref().filter(|l| l.worker == claimed_key) {
            self.store.add_traffic(claimed_key, l.block, bytes, 0)?;
        }
        Ok(id)
    }

    /// Records a refused authenticated upload: an update row with its reason, the claim
    /// (the worker's signed one when valid, else the coordinator's account) and, with
    /// `lease_state`, the lease's new state, all in one transaction; then a receipt. A
    /// failure to write the receipt is logged, not returned: the refusal stands, and the
    /// receipt is issued at the next start-up.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn reject(
        &mut self,
        key: &str,
        lease: Option<i64>,
        bytes: u64,
        reason: &str,
        body_hash: Option<&str>,
        claim: Option<(Claim, String)>,
        lease_state: Option<&str>,
        now: u64,
    ) -> Result<i64> {
        let row = lease.and_then(|l| self.find_lease(l).ok().flatten());
        let (claim, sig) = match claim {
            Some((c, s)) => (c, Some(s)),
            None => (
                trust::unsigned_claim(key, row.as_ref(), body_hash, None),
                None,
            ),
        };
        let json = serde_json::to_string(&claim).expect("claims serialise");
        let tx = self.store.conn().unchecked_transaction()?;
        let id = self.record_rejection(key, lease, bytes, reason, now)?;
        self.store.put_claim(id, &json, sig.as_deref())?;
        if let (Some(l), Some(state)) = (lease, lease_state) {
            self.store.set_lease_state(l, state)?;
        }
        tx.commit()?;
        let decision = Decision {
            accepted: false,
            reason: Some(reason.to_string()),
            resulting_version: None,
            heldout_before: None,
            heldout_after: None,
            time_ms: now,
            staleness: 0,
        };
        if let Err(e) = self.issue_receipt(Some(id), claim, sig, decision, now) {
            tracing::error!("update {id}: receipt deferred to the next start: {e}");
        }
        Ok(id)
    }

    /// Signs a receipt, appends it to the ledger, signs the new tree head, and notes
    /// that `update` (if any) has its receipt.
    pub(super) fn issue_receipt(
        &mut self,
        update: Option<i64>,
        claim: Claim,
        sig: Option<String>,
        decision: Decision,
        now: u64,
    ) -> Result<u64> {
        let receipt = Receipt::issue(claim, sig, decision, &self.identity);
        let index = self.ledger.append(self.store.conn(), &receipt)?;
        if let Some(u) = update {
            self.store.mark_receipted(u, index)?;
        }
        self.ledger.sign_head(self.store.conn(), now)?;
        Ok(index)
    }

    /// Issues the receipts a crash left out: every merged update, and every refused
    /// authenticated one (its claim is on record), that has no receipt yet.
    pub(super) fn issue_missing_receipts(&mut self, now: u64) -> Result<usize> {
        let missing = self.store.unreceipted()?;
        for (id, round, state, reason) in &missing {
            if state == update_state::APPLIED {
                let merged_into = round.map(|v| v as u64 + 1);
                self.merge_receipt(*id, merged_into, None, now)?;
            } else {
                let reason = reason.clone().unwrap_or_else(|| "refused".into());
                self.merge_receipt(*id, None, Some(reason), now)?;
            }
        }
        Ok(missing.len())
    }

    /// The receipt of an update decided at merge time: merged into `version`, or (None)
    /// rejected there. Its claim, screening numbers and staleness were stored when it
    /// arrived; a merged one's receipt records its staleness k.
    pub(super) fn merge_receipt(
        &mut self,
        update: i64,
        version: Option<u64>,
        reason: Option<String>,
        now: u64,
    ) -> Result<u64> {
        let (claim, sig) = match self.store.claim(update)? {
            Some((json, sig)) => (
                serde_json::from_str(&json).map_err(|e| {
                    NodeError::Config(format!("update {update}: stored claim: {e}"))
                })?,
                sig,
            ),
            // No claim on record (a crash between accepting and storing it): the
            // coordinator's own account, marked as not signed by the worker.
            None => {
                let (worker, lease, hash) = self.store.update_origin(update)?.ok_or_else(|| {
                    NodeError::Config(format!("update {update} is not on record"))
                })?;
                let row = lease.and_then(|l| self.find_lease(l).ok().flatten());
                (
                    trust::unsigned_claim(&worker, row.as_ref(), hash.as_deref(), None),
                    None,
                )
            }
        };
        let screening = self.store.screening(update)?;
        let staleness = match version {
            Some(_) => self.store.update_staleness(update)?,
            None => 0,
        };
        let decision = Decision {
            accepted: version.is_some(),
            reason: match version {
                Some(_) => None,
                None => Some(reason.unwrap_or_else(|| "refused".into())),
            },
            resulting_version: version,
            heldout_before: screening.map(|s| s.0),
            heldout_after: screening.map(|s| s.1),
            time_ms: now,
            staleness,
        };
        self.issue_receipt(Some(update), claim, sig, decision, now)
    }
}
