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

/// Accepted updates needed before the calibration replaces the configured threshold.
pub const SCREEN_CALIBRATION_MIN: usize = 8;
/// The calibrated threshold's ceiling, as a multiple of the configured one.
pub const SCREEN_CAP: f64 = 10.0;

/// The held-out screen's threshold given the configured one (`base`, nats/byte) and the
/// held-out changes of recently accepted updates: `base` until
/// [`SCREEN_CALIBRATION_MIN`] are known, then the median plus six robust standard
/// deviations (1.4826 x the median absolute deviation) of those changes, clamped to
/// [base, SCREEN_CAP x base]. Median and MAD move little while honest updates are the
/// majority, so a minority of attackers just under the line cannot walk it up.
pub fn calibrated_threshold(base: f64, recent: &[f64]) -> f64 {
    if recent.len() < SCREEN_CALIBRATION_MIN {
        return base;
    }
    let mut v = recent.to_vec();
    let mid = median(&mut v);
    let mut dev: Vec<f64> = v.iter().map(|x| (x - mid).abs()).collect();
    let mad = median(&mut dev);
    (mid + 6.0 * 1.4826 * mad).clamp(base, SCREEN_CAP * base)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn short(s: &str) -> String {
    s.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_screen_threshold_follows_the_honest_spread() {
        // Too few accepted updates: the configured value.
        assert_eq!(calibrated_threshold(0.05, &[0.2; 7]), 0.05);
        // Honest changes around +0.04 with spread 0.01: median 0.04, MAD 0.01, so
        // 0.04 + 6 x 1.4826 x 0.01 = 0.129.
        let honest = [0.03, 0.04, 0.05, 0.04, 0.03, 0.05, 0.04, 0.04, 0.03, 0.05];
        let t = calibrated_threshold(0.05, &honest);
        assert!((t - 0.12896).abs() < 1e-4, "{t}");
        // The false positive of the stall report (+0.063) now passes; a x3 or noise
        // update's jump of +0.5 does not.
        assert!(0.063 < t && t < 0.5);
        // Never below the configured value, never above 10x it.
        assert_eq!(calibrated_threshold(0.05, &[-0.5; 10]), 0.05);
        assert_eq!(calibrated_threshold(0.05, &[5.0; 10]), 0.5);
        // Two attackers at the line among eight honest updates barely move it.
        let mut mixed = honest[..8].to_vec();
        mixed.extend([t, t]);
        assert!(calibrated_threshold(0.05, &mixed) < 1.2 * t);
    }

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
