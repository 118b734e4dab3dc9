//! A round's merge in three steps (taken under the lock, run without it, committed under
//! it): uploads that arrive while it runs are told to retry with nothing recorded, and a
//! merge given up leaves the round open to merge again.
mod common;
use blocktrain_train::coordinator::Admitted;
use common::*;

fn upload(c: &mut Coordinator, k: &str, l: &Lease, v: f32, now: u64) -> Result<u64, NodeError> {
    let w0 = weights(c, k, l);
    let body = codec::encode(&filled(&w0, v), Codec::Fp32);
    let claim = claim(k, l, &body);
    match c.admit_update(k, l.id, body, Some(1.0), claim, now)? {
        Admitted::Vet(job) => c.decide(job.run(), now).map(|r| r.block_version),
        Admitted::Replayed(r) => Ok(r.block_version),
    }
}

#[test]
fn uploads_during_a_merge_retry_and_a_given_up_merge_reopens_the_round() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(1, 2);
    cfg.training.min_updates = 1;
    let mut c = with_two_workers(dir.path(), cfg);
    let (a, b) = (lease(&mut c, &key(1), 0), lease(&mut c, &key(2), 0));
    assert_eq!(
        upload(&mut c, &key(1), &a, 0.001, 5).unwrap(),
        0,
        "decided, not merged"
    );
    let job = c
        .begin_merge(0, 6)
        .unwrap()
        .expect("the quorum of one is in");
    assert!(
        c.begin_merge(0, 6).unwrap().is_none(),
        "one merge at a time"
    );
    let rejected = |c: &Coordinator| c.status().unwrap().updates.get("rejected").copied();
    match upload(&mut c, &key(2), &b, 0.002, 7) {
        Err(NodeError::Busy(m)) => assert!(m.contains("nothing stored"), "{m}"),
        other => panic!("an upload during the merge: {other:?}"),
    }
    assert_eq!(rejected(&c), None, "nothing recorded for it");
    drop(job);
    c.abort_merge(0);
    // The round is open again: the same upload is taken now, and the merge redone.
    assert_eq!(upload(&mut c, &key(2), &b, 0.002, 8).unwrap(), 0);
    let job = c.begin_merge(0, 9).unwrap().expect("still ready");
    c.finish_merge(job.run(), 10).unwrap();
    assert_eq!(c.history(0).unwrap().len(), 2);
    let next = lease(&mut c, &key(1), 11);
    assert_eq!(next.version, 1);
    let w1 = weights(&c, &key(1), &next);
    let w0 = weights(&c, &key(1), &a);
    for (n, x) in &w1 {
        let d = x.data[0] - w0[n].data[0];
        assert!((d - 0.0015).abs() < 1e-6, "{n}: both updates merged, {d}");
    }
}
