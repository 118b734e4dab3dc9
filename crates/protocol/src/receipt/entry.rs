//! One ledger entry: a worker's [`Claim`], the coordinator's [`Decision`] on it, and
//! the [`Receipt`] that signs both.
use serde::{Deserialize, Serialize};

use super::{context, sign_hex, tagged, CLAIM_TAG, DECISION_TAG, LEAF_TAG, RECEIPT_VERSION};
use crate::identity::{verify, Identity};
use crate::{ProtocolError, Result};

/// What a worker claims about one update it uploads (signed with its key).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    /// [`RECEIPT_VERSION`] when signed.
    pub version: u32,
    /// The worker's public key, hex.
    pub worker: String,
    /// The lease the update answers.
    pub lease: i64,
    /// Block index, 0-based.
    pub block: u32,
    /// Block version the update was trained from.
    pub base_version: u64,
    /// blake3 (hex) of the uploaded update body.
    pub update_blake3: String,
    /// Local steps trained.
    pub steps: i64,
    /// Bytes of training data read.
    pub data_bytes: u64,
    /// The worker's own final training loss.
    pub local_loss: Option<f64>,
}

/// The coordinator's decision on one upload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Whether the update was accepted.
    pub accepted: bool,
    /// Why it was rejected (or any note on acceptance).
    pub reason: Option<String>,
    /// The block version the update went into, when known at decision time.
    pub resulting_version: Option<u64>,
    /// Held-out loss of the block before the update, when measured.
    pub heldout_before: Option<f64>,
    /// Held-out loss after it, when measured.
    pub heldout_after: Option<f64>,
    /// Coordinator's clock at the decision, Unix ms.
    pub time_ms: u64,
    /// For a merged update, k: how many versions before the round it was merged into
    /// its base version was (0: a fresh update; more only with the run's
    /// `max_staleness`). Absent from the signed bytes when 0, so the receipts written
    /// before this field, and every fresh one, keep their bytes and verify as before.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub staleness: u64,
}

fn is_zero(k: &u64) -> bool {
    *k == 0
}

/// One ledger entry: a worker's claim and the coordinator's signed decision on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// What the worker claimed.
    pub claim: Claim,
    /// The worker's signature of `claim` (hex); `None` only for rejected uploads that
    /// carried no valid claim (the coordinator then fills `claim` with what it knows).
    pub claim_sig: Option<String>,
    /// What the coordinator decided.
    pub decision: Decision,
    /// The coordinator's public key, hex.
    pub coordinator: String,
    /// The coordinator's signature (hex) over claim, claim signature, decision and key.
    pub coordinator_sig: String,
}

impl Claim {
    /// The bytes the worker signs.
    pub fn signing_bytes(&self) -> Vec<u8> {
        tagged(CLAIM_TAG, self)
    }

    /// Signs this claim with the worker's key; returns the signature, hex.
    pub fn sign(&self, id: &Identity) -> String {
        sign_hex(id, &self.signing_bytes())
    }

    /// Checks `sig_hex` is `worker`'s signature of this claim, in a version we read.
    pub fn verify(&self, sig_hex: &str) -> Result<()> {
        if self.version != RECEIPT_VERSION {
            return Err(ProtocolError::Rejected(format!(
                "claim version {}, this build reads {RECEIPT_VERSION}",
                self.version
            )));
        }
        verify(&self.worker, &self.signing_bytes(), sig_hex)
    }
}

/// What the coordinator signs: everything in a receipt but its own signature.
#[derive(Serialize)]
struct Decided<'a> {
    claim: &'a Claim,
    claim_sig: &'a Option<String>,
    decision: &'a Decision,
    coordinator: &'a str,
}

impl Receipt {
    /// Signs `decision` on `claim` as `coordinator`.
    pub fn issue(
        claim: Claim,
        claim_sig: Option<String>,
        decision: Decision,
        coordinator: &Identity,
    ) -> Receipt {
        let mut r = Receipt {
            claim,
            claim_sig,
            decision,
            coordinator: coordinator.public_hex(),
            coordinator_sig: String::new(),
        };
        r.coordinator_sig = sign_hex(coordinator, &r.decided_bytes());
        r
    }

    fn decided_bytes(&self) -> Vec<u8> {
        tagged(
            DECISION_TAG,
            &Decided {
                claim: &self.claim,
                claim_sig: &self.claim_sig,
                decision: &self.decision,
                coordinator: &self.coordinator,
            },
        )
    }

    /// Checks both signatures; an accepted receipt must carry a valid worker claim.
    pub fn verify(&self) -> Result<()> {
        if self.claim.version != RECEIPT_VERSION {
            return Err(ProtocolError::Rejected(format!(
                "receipt version {}, this build reads {RECEIPT_VERSION}",
                self.claim.version
            )));
        }
        verify(
            &self.coordinator,
            &self.decided_bytes(),
            &self.coordinator_sig,
        )
        .map_err(|e| context("coordinator signature", e))?;
        match &self.claim_sig {
            Some(sig) => self
                .claim
                .verify(sig)
                .map_err(|e| context("worker claim signature", e)),
            None if self.decision.accepted => Err(ProtocolError::Unauthenticated(
                "accepted without a worker claim signature".into(),
            )),
            None => Ok(()),
        }
    }

    /// The canonical bytes hashed into the log as this receipt's leaf.
    pub fn leaf_bytes(&self) -> Vec<u8> {
        tagged(LEAF_TAG, self)
    }
}
