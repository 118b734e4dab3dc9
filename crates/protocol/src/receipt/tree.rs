//! The receipt log's signed [`TreeHead`]s and the inclusion and consistency proofs a
//! worker checks against them.
use ct_merkle::digest::{Digest, Output};
use ct_merkle::RootHash;
use serde::{Deserialize, Serialize};

use super::{context, sign_hex, tagged, Receipt, HEAD_TAG};
use crate::identity::{verify, Identity};
use crate::{ProtocolError, Result};

/// The log's hash function: ct-merkle's RFC 6962 tree over SHA-256.
pub type LogHash = sha2::Sha256;

/// A signed tree head: the coordinator's commitment to the first `size` receipts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeHead {
    /// Receipts in the log.
    pub size: u64,
    /// RFC 6962 Merkle tree hash of them, hex.
    pub root: String,
    /// Coordinator's clock when signed, Unix ms.
    pub time_ms: u64,
    /// The coordinator's public key, hex.
    pub coordinator: String,
    /// Its signature (hex) over size, root, time and key.
    pub sig: String,
}

/// Proof that the receipt at `index` is in the log of `size` receipts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    /// The receipt's index in the log.
    pub index: u64,
    /// The size of the tree head it is proven against.
    pub size: u64,
    /// ct-merkle's proof bytes (RFC 6962 audit path), hex.
    pub hashes: String,
}

/// Proof that the log of `old_size` receipts is a prefix of the log of `new_size`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyProof {
    /// Size of the older head.
    pub old_size: u64,
    /// Size of the newer head.
    pub new_size: u64,
    /// ct-merkle's proof bytes (RFC 6962 consistency proof), hex.
    pub hashes: String,
}

/// A receipt with all a worker needs to check it offline: a head and the inclusion proof
/// against it (what `blocktrain ledger prove` writes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptProof {
    /// The receipt.
    pub receipt: Receipt,
    /// A signed head whose log includes it.
    pub head: TreeHead,
    /// The inclusion proof against `head`.
    pub proof: InclusionProof,
}

/// What a tree head signature covers.
#[derive(Serialize)]
struct HeadBody<'a> {
    size: u64,
    root: &'a str,
    time_ms: u64,
    coordinator: &'a str,
}

impl TreeHead {
    /// Signs the head of a log of `size` receipts whose tree hash is `root`.
    pub fn sign(size: u64, root: &[u8], time_ms: u64, id: &Identity) -> Self {
        let mut head = TreeHead {
            size,
            root: hex::encode(root),
            time_ms,
            coordinator: id.public_hex(),
            sig: String::new(),
        };
        head.sig = sign_hex(id, &head.signing_bytes());
        head
    }

    fn signing_bytes(&self) -> Vec<u8> {
        tagged(
            HEAD_TAG,
            &HeadBody {
                size: self.size,
                root: &self.root,
                time_ms: self.time_ms,
                coordinator: &self.coordinator,
            },
        )
    }

    /// Checks the signature, and that an empty log's root is the empty tree's hash.
    pub fn verify(&self) -> Result<()> {
        verify(&self.coordinator, &self.signing_bytes(), &self.sig)
            .map_err(|e| context("tree head signature", e))?;
        if self.size > u64::MAX / 2 {
            // Past what ct-merkle's proof code accepts without panicking.
            return Err(ProtocolError::Rejected(format!(
                "tree head claims {} receipts",
                self.size
            )));
        }
        let root = self.root_hash()?;
        if self.size == 0 && root.as_bytes() != &LogHash::digest(b"") {
            return Err(ProtocolError::Rejected(
                "tree head of an empty log has a non-empty root".into(),
            ));
        }
        Ok(())
    }

    fn root_hash(&self) -> Result<RootHash<LogHash>> {
        let bytes = hex::decode(&self.root).ok();
        let digest = bytes
            .as_deref()
            .and_then(|b| Output::<LogHash>::try_from(b).ok())
            .ok_or_else(|| ProtocolError::Malformed("tree root is not 64 hex digits".into()))?;
        Ok(RootHash::new(digest, self.size))
    }
}

fn proof_bytes(hashes: &str) -> Result<Vec<u8>> {
    hex::decode(hashes).map_err(|_| ProtocolError::Malformed("proof is not hex".into()))
}

/// Checks `head`'s signature and that `receipt` is at `proof.index` in its log. The
/// receipt's own signatures are [`Receipt::verify`]'s to check.
pub fn verify_inclusion(head: &TreeHead, receipt: &Receipt, proof: &InclusionProof) -> Result<()> {
    head.verify()?;
    if proof.size != head.size {
        return Err(ProtocolError::Rejected(format!(
            "inclusion proof is for a log of {} receipts, the head's has {}",
            proof.size, head.size
        )));
    }
    let path = ct_merkle::InclusionProof::<LogHash>::try_from_bytes(proof_bytes(&proof.hashes)?)
        .map_err(|e| ProtocolError::Malformed(format!("inclusion proof: {e}")))?;
    head.root_hash()?
        .verify_inclusion(&receipt.leaf_bytes(), proof.index, &path)
        .map_err(|e| {
            ProtocolError::Rejected(format!(
                "receipt is not entry {} of the log of {} receipts: {e}",
                proof.index, head.size
            ))
        })
}

/// Checks both heads' signatures (by one coordinator) and that `old`'s log is a prefix
/// of `new`'s: the coordinator only ever appended.
pub fn verify_consistency(old: &TreeHead, new: &TreeHead, proof: &ConsistencyProof) -> Result<()> {
    old.verify().map_err(|e| context("old head", e))?;
    new.verify().map_err(|e| context("new head", e))?;
    if old.coordinator != new.coordinator {
        return Err(ProtocolError::Rejected(format!(
            "heads signed by different coordinators ({} and {})",
            old.coordinator, new.coordinator
        )));
    }
    if (proof.old_size, proof.new_size) != (old.size, new.size) {
        return Err(ProtocolError::Rejected(format!(
            "consistency proof is for sizes {} -> {}, the heads have {} -> {}",
            proof.old_size, proof.new_size, old.size, new.size
        )));
    }
    let bytes = proof_bytes(&proof.hashes)?;
    if old.size == 0 {
        // The empty log is a prefix of every log; ct-merkle has no proof for it.
        return match bytes.is_empty() {
            true => Ok(()),
            false => Err(ProtocolError::Malformed(
                "a proof from the empty log has no hashes".into(),
            )),
        };
    }
    let path = ct_merkle::ConsistencyProof::<LogHash>::try_from_bytes(bytes)
        .map_err(|e| ProtocolError::Malformed(format!("consistency proof: {e}")))?;
    new.root_hash()?
        .verify_consistency(&old.root_hash()?, &path)
        .map_err(|e| {
            ProtocolError::Rejected(format!(
                "the log of {} receipts is not an extension of the log of {}: {e}",
                new.size, old.size
            ))
        })
}

impl ReceiptProof {
    /// Checks the receipt's signatures, the head's, and the inclusion; with
    /// `coordinator`, also that both are that coordinator's.
    pub fn verify(&self, coordinator: Option<&str>) -> Result<()> {
        self.receipt.verify()?;
        if self.receipt.coordinator != self.head.coordinator {
            return Err(ProtocolError::Rejected(
                "receipt and tree head are signed by different coordinators".into(),
            ));
        }
        if let Some(key) = coordinator.filter(|k| !k.eq_ignore_ascii_case(&self.head.coordinator)) {
            return Err(ProtocolError::Unauthenticated(format!(
                "signed by coordinator {}, not the pinned {key}",
                self.head.coordinator
            )));
        }
        verify_inclusion(&self.head, &self.receipt, &self.proof)
    }
}
