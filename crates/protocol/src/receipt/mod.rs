//! Training receipts and the Certificate-Transparency-style log that holds them.
//!
//! A worker signs a [`Claim`] about each update it uploads; the coordinator adds its
//! [`Decision`] and signs the whole as a [`Receipt`], which it appends to an append-only
//! Merkle log (RFC 6962/9162 via `ct-merkle`, SHA-256). It signs [`TreeHead`]s of that
//! log and hands out inclusion proofs (this receipt is in the log a head commits to) and
//! consistency proofs (an older head's log is a prefix of a newer one), so a worker can
//! check alone that its receipt is recorded and that the log was never rewritten.
//!
//! Every signed or hashed byte string is a domain tag plus the serde_json text of a
//! struct (fields in declaration order). That text is canonical because our writer is
//! deterministic and a JSON round trip reproduces it exactly (integers as written,
//! floats through shortest round-trip formatting), so a receipt parsed back from storage
//! or the wire re-derives the very bytes that were signed. Non-finite floats write as
//! `null`, and read back as `None`, which gives the same bytes again.
use ct_merkle::digest::{Digest, Output};
use ct_merkle::RootHash;
use serde::{Deserialize, Serialize};

use crate::identity::{verify, Identity};
use crate::{ProtocolError, Result};

/// Version of the claim/receipt format this build writes and reads.
pub const RECEIPT_VERSION: u32 = 1;

/// The log's hash function: ct-merkle's RFC 6962 tree over SHA-256.
pub type LogHash = sha2::Sha256;

const CLAIM_TAG: &[u8] = b"blocktrain/claim/v1\n";
const DECISION_TAG: &[u8] = b"blocktrain/decision/v1\n";
const LEAF_TAG: &[u8] = b"blocktrain/receipt-leaf/v1\n";
const HEAD_TAG: &[u8] = b"blocktrain/tree-head/v1\n";

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

fn tagged<T: Serialize>(tag: &[u8], value: &T) -> Vec<u8> {
    let mut out = tag.to_vec();
    // These structs hold only strings, numbers and options: serializing cannot fail.
    serde_json::to_writer(&mut out, value).expect("receipt types serialize");
    out
}

/// Prefixes an authentication failure with what was being checked.
fn context(what: &str, e: ProtocolError) -> ProtocolError {
    match e {
        ProtocolError::Unauthenticated(m) => ProtocolError::Unauthenticated(format!("{what}: {m}")),
        ProtocolError::Rejected(m) => ProtocolError::Rejected(format!("{what}: {m}")),
        ProtocolError::Malformed(m) => ProtocolError::Malformed(format!("{what}: {m}")),
    }
}

fn sign_hex(id: &Identity, message: &[u8]) -> String {
    hex::encode(id.sign(message))
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

#[cfg(test)]
mod tests {
    use ct_merkle::mem_backed_tree::MemoryBackedTree;

    use super::*;

    fn claim(worker: &Identity, lease: i64) -> Claim {
        Claim {
            version: RECEIPT_VERSION,
            worker: worker.public_hex(),
            lease,
            block: 1,
            base_version: 4,
            update_blake3: "ab".repeat(32),
            steps: 100,
            data_bytes: 1 << 20,
            local_loss: Some(2.5),
        }
    }

    fn decision(accepted: bool) -> Decision {
        Decision {
            accepted,
            reason: (!accepted).then(|| "norm too large".into()),
            resulting_version: accepted.then_some(5),
            heldout_before: Some(3.0),
            heldout_after: Some(2.9),
            time_ms: 1_000,
        }
    }

    fn receipt(worker: &Identity, coord: &Identity, lease: i64) -> Receipt {
        let c = claim(worker, lease);
        let sig = c.sign(worker);
        Receipt::issue(c, Some(sig), decision(lease % 2 == 0), coord)
    }

    /// A log of `n` receipts, the tree over them, and a head of it.
    fn log(n: i64, coord: &Identity) -> (Vec<Receipt>, MemoryBackedTree<LogHash, Vec<u8>>) {
        let worker = Identity::generate();
        let receipts: Vec<_> = (0..n).map(|i| receipt(&worker, coord, i)).collect();
        let mut tree = MemoryBackedTree::new();
        for r in &receipts {
            tree.push(r.leaf_bytes());
        }
        (receipts, tree)
    }

    fn head(tree: &MemoryBackedTree<LogHash, Vec<u8>>, id: &Identity) -> TreeHead {
        TreeHead::sign(tree.len(), tree.root().as_bytes(), 7, id)
    }

    #[test]
    fn round_trip_through_json_still_verifies() {
        let (w, c) = (Identity::generate(), Identity::generate());
        let mut r = receipt(&w, &c, 2);
        r.claim.local_loss = Some(0.1 + 0.2); // a float with a long shortest form
        r = Receipt::issue(r.claim.clone(), Some(r.claim.sign(&w)), r.decision, &c);
        r.verify().unwrap();
        let back: Receipt = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        back.verify().unwrap();
        assert_eq!(back.leaf_bytes(), r.leaf_bytes());
        let extra = serde_json::to_string(&r)
            .unwrap()
            .replacen('{', "{\"x\":1,", 1);
        assert!(serde_json::from_str::<Receipt>(&extra).is_err());
    }

    #[test]
    fn any_changed_field_breaks_the_signatures() {
        let (w, c) = (Identity::generate(), Identity::generate());
        let r = receipt(&w, &c, 2);
        let claim_edits: Vec<fn(&mut Claim)> = vec![
            |c| c.version = 2,
            |c| c.worker = Identity::generate().public_hex(),
            |c| c.lease += 1,
            |c| c.block += 1,
            |c| c.base_version += 1,
            |c| c.update_blake3 = "cd".repeat(32),
            |c| c.steps += 1,
            |c| c.data_bytes += 1,
            |c| c.local_loss = None,
        ];
        for edit in claim_edits {
            let mut bad = r.clone();
            edit(&mut bad.claim);
            assert!(bad.claim.verify(bad.claim_sig.as_ref().unwrap()).is_err());
            assert!(bad.verify().is_err());
        }
        let decision_edits: Vec<fn(&mut Decision)> = vec![
            |d| d.accepted = !d.accepted,
            |d| d.reason = Some("x".into()),
            |d| d.resulting_version = None,
            |d| d.heldout_before = Some(9.0),
            |d| d.heldout_after = None,
            |d| d.time_ms += 1,
        ];
        for edit in decision_edits {
            let mut bad = r.clone();
            edit(&mut bad.decision);
            let err = bad.verify().unwrap_err().to_string();
            assert!(err.contains("coordinator signature"), "{err}");
        }
        let mut bad = r.clone();
        bad.claim_sig = Some(bad.claim.sign(&c));
        assert!(bad.verify().is_err());
        let mut bad = r.clone();
        bad.coordinator = w.public_hex();
        assert!(bad.verify().is_err());
    }

    #[test]
    fn a_missing_claim_signature_is_allowed_only_for_rejections() {
        let (w, c) = (Identity::generate(), Identity::generate());
        Receipt::issue(claim(&w, 1), None, decision(false), &c)
            .verify()
            .unwrap();
        let err = Receipt::issue(claim(&w, 1), None, decision(true), &c)
            .verify()
            .unwrap_err();
        assert!(err.to_string().contains("without a worker claim"), "{err}");
    }

    #[test]
    fn tree_heads_sign_every_field() {
        let id = Identity::generate();
        let h = TreeHead::sign(3, &[7; 32], 9, &id);
        h.verify().unwrap();
        let edits: Vec<fn(&mut TreeHead)> = vec![
            |h| h.size += 1,
            |h| h.root = "00".repeat(32),
            |h| h.time_ms += 1,
            |h| h.coordinator = Identity::generate().public_hex(),
            |h| h.root = "zz".into(),
        ];
        for edit in edits {
            let mut bad = h.clone();
            edit(&mut bad);
            assert!(bad.verify().is_err());
        }
        assert!(TreeHead::sign(0, &[7; 32], 9, &id).verify().is_err());
        TreeHead::sign(0, &LogHash::digest(b""), 9, &id)
            .verify()
            .unwrap();
    }

    #[test]
    fn inclusion_proofs_verify_and_catch_tampering() {
        let c = Identity::generate();
        let (receipts, tree) = log(7, &c);
        let h = head(&tree, &c);
        for (i, r) in receipts.iter().enumerate() {
            let p = InclusionProof {
                index: i as u64,
                size: 7,
                hashes: hex::encode(tree.prove_inclusion(i).as_bytes()),
            };
            verify_inclusion(&h, r, &p).unwrap();
            let mut changed = r.clone();
            changed.claim.steps += 1;
            assert!(verify_inclusion(&h, &changed, &p).is_err());
            let moved = InclusionProof {
                index: (i as u64 + 1) % 7,
                ..p.clone()
            };
            assert!(verify_inclusion(&h, r, &moved).is_err());
            let mut bytes = hex::decode(&p.hashes).unwrap();
            bytes[0] ^= 1;
            let flipped = InclusionProof {
                hashes: hex::encode(bytes),
                ..p.clone()
            };
            assert!(verify_inclusion(&h, r, &flipped).is_err());
            let odd = InclusionProof {
                hashes: format!("{}00", p.hashes),
                ..p.clone()
            };
            assert!(verify_inclusion(&h, r, &odd).is_err());
            let full = ReceiptProof {
                receipt: r.clone(),
                head: h.clone(),
                proof: p,
            };
            full.verify(Some(&c.public_hex())).unwrap();
            assert!(full
                .verify(Some(&Identity::generate().public_hex()))
                .is_err());
        }
        let mut forged = h.clone();
        forged.root = "00".repeat(32);
        let p = InclusionProof {
            index: 0,
            size: 7,
            hashes: hex::encode(tree.prove_inclusion(0).as_bytes()),
        };
        assert!(verify_inclusion(&forged, &receipts[0], &p).is_err());
    }

    #[test]
    fn consistency_proofs_verify_and_catch_rewrites() {
        let c = Identity::generate();
        let (receipts, tree) = log(7, &c);
        let new = head(&tree, &c);
        let mut prefix = MemoryBackedTree::<LogHash, Vec<u8>>::new();
        for r in &receipts[..3] {
            prefix.push(r.leaf_bytes());
        }
        let old = head(&prefix, &c);
        let p = ConsistencyProof {
            old_size: 3,
            new_size: 7,
            hashes: hex::encode(tree.prove_consistency(4).as_bytes()),
        };
        verify_consistency(&old, &new, &p).unwrap();
        assert!(verify_consistency(&new, &old, &p).is_err());

        // A log whose entry 1 was replaced: its head cannot extend the old one.
        let mut rewritten = MemoryBackedTree::<LogHash, Vec<u8>>::new();
        for (i, r) in receipts.iter().enumerate() {
            let mut r = r.clone();
            if i == 1 {
                r = Receipt::issue(r.claim, None, decision(false), &c);
            }
            rewritten.push(r.leaf_bytes());
        }
        let forged = head(&rewritten, &c);
        let p2 = ConsistencyProof {
            hashes: hex::encode(rewritten.prove_consistency(4).as_bytes()),
            ..p.clone()
        };
        assert!(verify_consistency(&old, &forged, &p2).is_err());
        assert!(verify_consistency(&old, &forged, &p).is_err());

        let empty = TreeHead::sign(0, &LogHash::digest(b""), 1, &c);
        let from_empty = ConsistencyProof {
            old_size: 0,
            new_size: 7,
            hashes: String::new(),
        };
        verify_consistency(&empty, &new, &from_empty).unwrap();
        let other = TreeHead::sign(7, tree.root().as_bytes(), 7, &Identity::generate());
        let same = ConsistencyProof {
            old_size: 7,
            new_size: 7,
            hashes: String::new(),
        };
        verify_consistency(&new, &new, &same).unwrap();
        assert!(verify_consistency(&new, &other, &same).is_err());
    }
}

#[cfg(test)]
mod float_tests {
    use super::*;

    /// A claim travels as JSON and is verified after parsing: floats must parse back to
    /// the exact value (serde_json's `float_roundtrip`), or signatures over awkward
    /// losses would fail at random.
    #[test]
    fn claims_with_awkward_floats_verify_after_a_json_round_trip() {
        let id = Identity::generate();
        for i in 0..2000u64 {
            let loss = 2.0 + (i as f64 * 0.618_033_988_749_895).fract() / 3.0;
            let claim = Claim {
                version: RECEIPT_VERSION,
                worker: id.public_hex(),
                lease: i as i64,
                block: 1,
                base_version: 2,
                update_blake3: "ab".repeat(32),
                steps: 5,
                data_bytes: 10,
                local_loss: Some(loss),
            };
            let sig = claim.sign(&id);
            let back: Claim = serde_json::from_slice(&serde_json::to_vec(&claim).unwrap()).unwrap();
            back.verify(&sig).unwrap();
        }
    }
}
