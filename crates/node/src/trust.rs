//! What the coordinator checks before it believes an update, beyond its shape:
//!
//! - **the claim**: the worker's signed statement of what it uploaded (its key, lease,
//!   block, base version, blake3 of the body, steps, data bytes, local loss) must match
//!   the lease and the bytes, and verify under the worker's key;
//! - **replays**: a body already accepted (from this or another key) is refused;
//! - **held-out screening**: the block's held-out loss after applying the update alone
//!   may not exceed the loss before by more than `[trust] screen_threshold`;
//! - **spot checks**: a seeded sample (`[trust] spot_check_fraction`) of updates is
//!   recomputed from the same start weights, shard, seed and steps
//!   ([`crate::verify`]) and must match within the codec's tolerance; a mismatch
//!   rejects the update and flags the worker.
//!
//! Every decision, accept or reject, becomes a receipt in the ledger ([`crate::ledger`]).
use blocktrain_protocol::receipt::{Claim, RECEIPT_VERSION};

use crate::store::LeaseRow;

/// Checks a worker's claim against its lease and the bytes it sent.
pub fn check_claim(
    claim: &Claim,
    sig: &str,
    key: &str,
    lease: &LeaseRow,
    body_hash: &str,
) -> Result<(), String> {
    let mismatch = |what: &str, claimed: String, actual: String| {
        Err(format!(
            "claim: {what} is {claimed}, but the upload's is {actual}"
        ))
    };
    if claim.version != RECEIPT_VERSION {
        return mismatch(
            "version",
            claim.version.to_string(),
            RECEIPT_VERSION.to_string(),
        );
    }
    if claim.worker != key {
        return mismatch("worker", short(&claim.worker), short(key));
    }
    if claim.lease != lease.id {
        return mismatch("lease", claim.lease.to_string(), lease.id.to_string());
    }
    if claim.block as usize != lease.block {
        return mismatch("block", claim.block.to_string(), lease.block.to_string());
    }
    if claim.base_version != lease.version {
        return mismatch(
            "base version",
            claim.base_version.to_string(),
            lease.version.to_string(),
        );
    }
    if claim.steps != lease.steps {
        return mismatch("steps", claim.steps.to_string(), lease.steps.to_string());
    }
    if claim.update_blake3 != body_hash {
        return mismatch(
            "update blake3",
            short(&claim.update_blake3),
            short(body_hash),
        );
    }
    claim
        .verify(sig)
        .map_err(|e| format!("claim signature: {e}"))
}

/// The coordinator's own account of an upload that came without a valid claim (so its
/// rejection still gets a receipt, marked unsigned by the worker).
pub fn unsigned_claim(
    key: &str,
    lease: Option<&LeaseRow>,
    body_hash: Option<&str>,
    loss: Option<f64>,
) -> Claim {
    Claim {
        version: RECEIPT_VERSION,
        worker: key.to_string(),
        lease: lease.map_or(-1, |l| l.id),
        block: lease.map_or(0, |l| l.block as u32),
        base_version: lease.map_or(0, |l| l.version),
        update_blake3: body_hash.unwrap_or_default().to_string(),
        steps: lease.map_or(0, |l| l.steps),
        data_bytes: 0,
        local_loss: loss,
    }
}

/// Whether update `hash` is spot-checked: a draw keyed with the coordinator's secret,
/// so it is reproducible for the coordinator but a worker cannot tell in advance which
/// of its updates will be recomputed (and cheat only on the others).
pub fn sampled_for_spot_check(secret: &[u8; 32], hash: &str, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    if fraction >= 1.0 {
        return true;
    }
    let h = blake3::keyed_hash(secret, format!("spot-check/{hash}").as_bytes());
    let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
    (x as f64 / u64::MAX as f64) < fraction
}

fn short(s: &str) -> String {
    s.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spot_check_sampling_is_seeded_and_near_its_fraction() {
        let k = [7u8; 32];
        let hits = (0..2000)
            .filter(|i| sampled_for_spot_check(&k, &format!("{i:064x}"), 0.25))
            .count();
        assert!((400..600).contains(&hits), "{hits}");
        assert_eq!(
            sampled_for_spot_check(&k, "ab", 0.5),
            sampled_for_spot_check(&k, "ab", 0.5)
        );
        assert!(!sampled_for_spot_check(&k, "ab", 0.0));
        assert!(sampled_for_spot_check(&k, "ab", 1.0));
    }
}
