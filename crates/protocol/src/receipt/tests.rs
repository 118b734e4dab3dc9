use ct_merkle::digest::Digest;
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
        staleness: 0,
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

#[test]
fn staleness_is_signed_when_set_and_absent_from_fresh_receipts_bytes() {
    let (w, c) = (Identity::generate(), Identity::generate());
    // A fresh receipt's bytes have no staleness key: receipts written before the field
    // existed parse (k = 0) and re-derive the very bytes that were signed.
    let fresh = receipt(&w, &c, 2);
    let json = serde_json::to_string(&fresh).unwrap();
    assert!(!json.contains("staleness"), "{json}");
    let back: Receipt = serde_json::from_str(&json).unwrap();
    assert_eq!(back.decision.staleness, 0);
    back.verify().unwrap();
    assert_eq!(back.leaf_bytes(), fresh.leaf_bytes());
    // A stale update's receipt signs its k: it round-trips, and changing it breaks the
    // coordinator's signature.
    let mut d = decision(true);
    d.staleness = 2;
    let cl = claim(&w, 4);
    let stale = Receipt::issue(cl.clone(), Some(cl.sign(&w)), d, &c);
    let json = serde_json::to_string(&stale).unwrap();
    assert!(json.contains("\"staleness\":2"), "{json}");
    let mut back: Receipt = serde_json::from_str(&json).unwrap();
    back.verify().unwrap();
    back.decision.staleness = 1;
    assert!(back.verify().is_err());
}
