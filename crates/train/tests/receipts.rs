//! Every decision of the coordinator gets a signed receipt in one log, refusals of
//! unsigned updates and replays included.
mod common;
use common::*;

#[test]
fn every_decision_gets_a_signed_receipt_and_replays_and_unsigned_updates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_two_workers(dir.path(), tiny(1, 2));
    let (a, b) = (lease(&mut c, &key(1), 0), lease(&mut c, &key(2), 0));
    let w0 = weights(&c, &key(1), &a);
    let body = codec::encode(&filled(&w0, 0.001), Codec::Fp32);
    // No claim, and a claim signed by somebody else: refused, each with a receipt.
    let e = c
        .submit_update(&key(1), a.id, &body, None, None, 1)
        .unwrap_err();
    assert!(e.to_string().contains("claim"), "{e}");
    let forged = claim(&key(2), &a, &body).map(|(mut cl, sig)| {
        cl.worker = key(1);
        (cl, sig)
    });
    // Each refusal closes its lease: the worker asks for another.
    let a = lease(&mut c, &key(1), 2);
    let forged = forged.map(|(mut cl, sig)| {
        cl.lease = a.id;
        (cl, sig)
    });
    let e = c
        .submit_update(&key(1), a.id, &body, None, forged, 2)
        .unwrap_err();
    assert!(e.to_string().contains("claim"), "{e}");
    // The honest upload, then the same bytes replayed by the other worker on its lease.
    let a = lease(&mut c, &key(1), 3);
    c.submit_update(&key(1), a.id, &body, None, claim(&key(1), &a, &body), 3)
        .unwrap();
    let e = c
        .submit_update(&key(2), b.id, &body, None, claim(&key(2), &b, &body), 4)
        .unwrap_err();
    assert!(e.to_string().contains("replay"), "{e}");
    let b = lease(&mut c, &key(2), 5);
    let other = codec::encode(&filled(&w0, 0.002), Codec::Fp32);
    c.submit_update(&key(2), b.id, &other, None, claim(&key(2), &b, &other), 5)
        .unwrap();
    assert_eq!(c.status().unwrap().blocks[0].version, 1);

    // 3 rejections + 2 accepted (receipted at the merge), all signed, in one log.
    let report = blocktrain_train::ledger::verify_all(c.conn()).unwrap();
    assert_eq!(report.receipts, 5);
    assert_eq!(report.coordinator.as_deref(), Some(c.public_key().as_str()));
    let entries = blocktrain_train::ledger::Ledger::entries(c.conn()).unwrap();
    let accepted: Vec<_> = entries
        .iter()
        .filter(|(_, r)| r.decision.accepted)
        .collect();
    assert_eq!(accepted.len(), 2);
    assert!(accepted
        .iter()
        .all(|(_, r)| r.decision.resulting_version == Some(1) && r.claim_sig.is_some()));
    let reasons: Vec<String> = entries
        .iter()
        .filter_map(|(_, r)| r.decision.reason.clone())
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("replay")));
    // The replay's receipt carries the replaying worker's own signed claim.
    let replay = entries
        .iter()
        .find(|(_, r)| {
            r.decision
                .reason
                .as_deref()
                .is_some_and(|x| x.contains("replay"))
        })
        .unwrap();
    assert_eq!(replay.1.claim.worker, key(2));
    assert!(replay.1.claim_sig.is_some());
}
