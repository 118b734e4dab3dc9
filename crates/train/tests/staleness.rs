//! Asynchronous updates (`[training] max_staleness`): an update computed from an older
//! version joins the current round and is merged at s(k) = (1 + k)^-a of its delta
//! (steps-weighted, the denominator still the round's steps), its receipt records k, and
//! a restart keeps open stale leases and pending stale updates; an upload screened
//! before its block moved on is screened again.
mod common;
use blocktrain_train::coordinator::Admitted;
use blocktrain_train::ledger::Ledger;
use blocktrain_train::merge::staleness_scale;
use common::*;

/// One block of `per_block` workers with K = 1, and leases that outlive the round's
/// deadline (so the old version's leases are still active when the round closes).
fn stale_run(per_block: u32) -> RunConfig {
    let mut cfg = tiny(1, per_block);
    cfg.training.max_staleness = 1;
    cfg.faults.lease_secs = 1000.0;
    cfg
}

/// Every weight of `after` minus `before` is `want` (the synthetic deltas are constant).
fn moved_by(after: &Arrays, before: &Arrays, want: f64) {
    for (n, a) in after.iter().filter(|(n, _)| !n.starts_with("adam.")) {
        for (x, y) in a.data.iter().zip(&before[n].data) {
            let d = (x - y) as f64;
            assert!((d - want).abs() < 1e-6, "{n}: moved {d}, expected {want}");
        }
    }
}

fn receipt_of_lease(c: &Coordinator, lease: i64) -> blocktrain_protocol::receipt::Receipt {
    Ledger::entries(c.conn())
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .find(|r| r.claim.lease == lease)
        .unwrap_or_else(|| panic!("no receipt for lease {lease}"))
}

#[test]
fn a_stale_update_joins_the_current_round_at_s_k_of_its_steps_share() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::open(dir.path(), Some(stale_run(2)), 0).unwrap();
    for i in 1..=4 {
        join(&mut c, &key(i));
    }
    let (a, b) = (lease(&mut c, &key(1), 0), lease(&mut c, &key(2), 0));
    let w0 = weights(&c, &key(1), &a);
    assert_eq!(submit(&mut c, &key(1), &a, &w0, 0.001, 5).unwrap(), 0);
    // b never delivers in round 0: the deadline closes it with a's update alone.
    c.tick(100_005).unwrap();
    assert_eq!(c.status().unwrap().blocks[0].version, 1);
    // b's lease (version 0) is one version old, within K = 1: still wanted, still held
    // (with its own version's copy), and still holding its slot.
    assert!(c.heartbeat(&key(2), b.id, 100_006).unwrap());
    let again = lease(&mut c, &key(2), 100_006);
    assert_eq!((again.id, again.version), (b.id, 0));
    assert_eq!(again.weights_hash, a.weights_hash);
    let l3 = lease(&mut c, &key(3), 100_007);
    assert_eq!(l3.version, 1);
    assert_ne!(l3.shard_index, b.shard_index, "b keeps its shard");
    assert!(matches!(
        c.request_work(&key(4), &info(), 100_007).unwrap(),
        WorkReply::Wait { .. }
    ));
    let w1 = weights(&c, &key(3), &l3);
    moved_by(&w1, &w0, 0.001);
    // b's stale update is taken into round 1 and counts toward its quorum of two.
    assert_eq!(submit(&mut c, &key(2), &b, &w0, 0.004, 100_008).unwrap(), 1);
    let s = c.status().unwrap();
    assert_eq!(s.blocks[0].pending_updates, 1);
    assert_eq!((s.recent[0].version, s.recent[0].staleness), (Some(0), 1));
    assert_eq!(
        submit(&mut c, &key(3), &l3, &w1, 0.002, 100_009).unwrap(),
        2
    );
    // Both trained 4 steps: (4 x 0.002 + 4 x s(1) x 0.004) / 8, s(1) = 2^-0.5; not
    // renormalized (that would be / (4 + 4 s(1))).
    let s1 = staleness_scale(1, 0.5);
    assert!((s1 - 0.5f64.sqrt()).abs() < 1e-15);
    let next = lease(&mut c, &key(1), 100_010);
    assert_eq!(next.version, 2);
    moved_by(
        &weights(&c, &key(1), &next),
        &w1,
        (4.0 * 0.002 + 4.0 * s1 * 0.004) / 8.0,
    );
    // Receipts: k for the stale update, 0 for the fresh ones; the log verifies.
    let rb = receipt_of_lease(&c, b.id);
    assert!(rb.decision.accepted);
    assert_eq!(
        (
            rb.claim.base_version,
            rb.decision.resulting_version,
            rb.decision.staleness
        ),
        (0, Some(2), 1)
    );
    let r3 = receipt_of_lease(&c, l3.id);
    assert_eq!(
        (r3.decision.resulting_version, r3.decision.staleness),
        (Some(2), 0)
    );
    assert_eq!(receipt_of_lease(&c, a.id).decision.staleness, 0);
    assert_eq!(
        blocktrain_train::ledger::verify_all(c.conn())
            .unwrap()
            .receipts,
        3
    );
}

#[test]
fn a_lone_stale_update_moves_weights_and_moments_by_s_k_of_its_delta() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = stale_run(2);
    cfg.training.min_updates = 1;
    cfg.training.optimizer_state = blocktrain_train::config::OptimizerState::Carry;
    let mut c = with_two_workers(dir.path(), cfg);
    let (a, b) = (lease(&mut c, &key(1), 0), lease(&mut c, &key(2), 0));
    let w0 = weights(&c, &key(1), &a);
    // Weights' delta `w`, first moments' `m`, second moments' roots' `r`, fp32. The
    // moments are given per unit of 1/sqrt(values), so they stay inside the set a merge
    // projects served moments into (L2 within grad_clip; `moments::project`).
    let per = 1.0 / (w0.values().map(|x| x.data.len()).sum::<usize>() as f32).sqrt();
    let update = |w: f32, m: f32, r: f32| {
        let (m, r) = (m * per, r * per);
        let mut all = filled(&w0, w);
        for p in [("adam.m/", m), ("adam.rms/", r)] {
            all.extend(
                filled(&w0, p.1)
                    .into_iter()
                    .map(|(n, a)| (format!("{}{n}", p.0), a)),
            );
        }
        codec::encode(&all, Codec::Fp32)
    };
    let body = update(0.001, 0.01, 0.02);
    let r = c
        .submit_update(&key(1), a.id, &body, None, claim(&key(1), &a, &body), 5)
        .unwrap();
    assert_eq!(r.block_version, 1, "a quorum of one");
    let l1 = lease(&mut c, &key(1), 6);
    let v1 = weights(&c, &key(1), &l1);
    // b's update, one version old, alone in round 1: applied at s(1), not at 1.
    let body = update(0.004, 0.04, 0.08);
    let r = c
        .submit_update(&key(2), b.id, &body, None, claim(&key(2), &b, &body), 7)
        .unwrap();
    assert_eq!(r.block_version, 2);
    let s1 = staleness_scale(1, 0.5);
    let l2 = lease(&mut c, &key(2), 8);
    let v2 = weights(&c, &key(2), &l2);
    moved_by(&v2, &v1, s1 * 0.004);
    // The moments served next: round 1's served moments plus the same scaled mean.
    for (n, x) in v2.iter().filter(|(n, _)| n.starts_with("adam.")) {
        let want = if n.starts_with("adam.m/") { 0.04 } else { 0.08 } * s1 * per as f64;
        for (x, y) in x.data.iter().zip(&v1[n].data) {
            let d = (x - y) as f64;
            assert!((d - want).abs() < 1e-6, "{n}: moved {d}, expected {want}");
        }
    }
    assert_eq!(receipt_of_lease(&c, b.id).decision.staleness, 1);
    let s = c.status().unwrap();
    assert_eq!(
        (s.updates["applied"], s.stale_applied),
        (2, 1),
        "one of two merged stale"
    );
}

#[test]
fn an_upload_screened_before_its_block_moved_on_is_screened_again_not_decided() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = stale_run(2);
    cfg.training.min_updates = 1;
    // Screening on, passing every update: this test is about which weights the screen
    // judged, not about its verdict.
    cfg.trust.screen_windows = 2;
    cfg.trust.screen_threshold = 1e6;
    let mut c = with_two_workers(dir.path(), cfg);
    let (a, b) = (lease(&mut c, &key(1), 0), lease(&mut c, &key(2), 0));
    let w0 = weights(&c, &key(1), &a);
    // b's upload is admitted and screened at k = 0, whole, on version 0's weights ...
    let body = codec::encode(&filled(&w0, 0.004), Codec::Fp32);
    let vetted = match c
        .admit_update(
            &key(2),
            b.id,
            body.clone(),
            None,
            claim(&key(2), &b, &body),
            5,
        )
        .unwrap()
    {
        Admitted::Vet(job) => job.run(),
        Admitted::Replayed(_) => panic!("a first upload cannot be a replay"),
    };
    // ... while a's update commits round 0 (a quorum of one).
    assert_eq!(submit(&mut c, &key(1), &a, &w0, 0.001, 6).unwrap(), 1);
    // Now it would join round 1 at s(1) on version 1's weights, which it was not
    // screened on: not decided, nothing stored, the lease still open.
    let e = c.decide(vetted, 7).unwrap_err();
    assert!(
        matches!(&e, NodeError::Busy(m) if m.contains("from version 0 to 1")),
        "{e}"
    );
    assert_eq!(c.status().unwrap().blocks[0].pending_updates, 0);
    // The retry is screened at k = 1 and merged into round 1.
    assert_eq!(submit(&mut c, &key(2), &b, &w0, 0.004, 8).unwrap(), 2);
    assert_eq!(receipt_of_lease(&c, b.id).decision.staleness, 1);
}

#[test]
fn a_restart_keeps_open_stale_leases_and_pending_stale_updates() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = stale_run(3);
    let (a, b, d, w0) = {
        let mut c = Coordinator::open(dir.path(), Some(cfg.clone()), 0).unwrap();
        for i in 1..=6 {
            join(&mut c, &key(i));
        }
        let a = lease(&mut c, &key(1), 0);
        let b = lease(&mut c, &key(2), 0);
        let d = lease(&mut c, &key(3), 0);
        let w0 = weights(&c, &key(1), &a);
        submit(&mut c, &key(1), &a, &w0, 0.001, 5).unwrap();
        c.tick(100_005).unwrap();
        assert_eq!(c.status().unwrap().blocks[0].version, 1);
        // b's stale update waits in round 1; d's lease is still open.
        assert_eq!(submit(&mut c, &key(2), &b, &w0, 0.004, 100_006).unwrap(), 1);
        (a, b, d, w0)
    };
    let mut c = Coordinator::open(dir.path(), None, 200_000).unwrap();
    let s = c.status().unwrap();
    assert_eq!((s.blocks[0].version, s.blocks[0].pending_updates), (1, 1));
    assert_eq!(s.blocks[0].active_leases, 1, "d's lease of version 0");
    // d's lease came back as it was: wanted, handed back with version 0's copy.
    assert!(c.heartbeat(&key(3), d.id, 200_001).unwrap());
    let again = lease(&mut c, &key(3), 200_001);
    assert_eq!((again.id, again.version), (d.id, 0));
    assert_eq!(again.weights_hash, a.weights_hash);
    // Slots: d's and b's (its update in round 1) are taken; one is left.
    let e = lease(&mut c, &key(4), 200_002);
    assert_eq!(e.version, 1);
    assert!(![b.shard_index, d.shard_index].contains(&e.shard_index));
    assert!(matches!(
        c.request_work(&key(5), &info(), 200_002).unwrap(),
        WorkReply::Wait { .. }
    ));
    // b re-sends (its reply was lost): the same update, not a second one.
    let body = codec::encode(&filled(&w0, 0.004), Codec::Fp32);
    c.submit_update(
        &key(2),
        b.id,
        &body,
        None,
        claim(&key(2), &b, &body),
        200_003,
    )
    .unwrap();
    assert_eq!(c.status().unwrap().blocks[0].pending_updates, 1);
    // The round closes with its quorum of three: b and d stale, e fresh.
    let w1 = weights(&c, &key(4), &e);
    assert_eq!(submit(&mut c, &key(3), &d, &w0, 0.002, 200_004).unwrap(), 1);
    assert_eq!(submit(&mut c, &key(4), &e, &w1, 0.003, 200_005).unwrap(), 2);
    let s1 = staleness_scale(1, 0.5);
    let next = lease(&mut c, &key(5), 200_006);
    moved_by(
        &weights(&c, &key(5), &next),
        &w1,
        (4.0 * s1 * 0.004 + 4.0 * s1 * 0.002 + 4.0 * 0.003) / 12.0,
    );
    for (l, k) in [(&b, 1), (&d, 1), (&e, 0)] {
        let r = receipt_of_lease(&c, l.id);
        assert_eq!(
            (r.decision.resulting_version, r.decision.staleness),
            (Some(2), k)
        );
    }
}

#[test]
fn a_lease_two_versions_behind_is_superseded_and_its_upload_refused_as_stale() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = stale_run(2);
    cfg.training.min_updates = 1;
    let mut c = Coordinator::open(dir.path(), Some(cfg), 0).unwrap();
    for i in 1..=3 {
        join(&mut c, &key(i));
    }
    let (a, b) = (lease(&mut c, &key(1), 0), lease(&mut c, &key(2), 0));
    let w0 = weights(&c, &key(1), &a);
    assert_eq!(submit(&mut c, &key(1), &a, &w0, 0.001, 5).unwrap(), 1);
    assert!(c.heartbeat(&key(2), b.id, 6).unwrap(), "one version behind");
    let l = lease(&mut c, &key(3), 7);
    assert_eq!(submit(&mut c, &key(3), &l, &w0, 0.002, 8).unwrap(), 2);
    // Two versions behind with K = 1: superseded in the journal, not wanted, stale.
    let state: String = c
        .conn()
        .query_row("SELECT state FROM leases WHERE id = ?1", [b.id], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(state, "superseded");
    assert!(!c.heartbeat(&key(2), b.id, 9).unwrap());
    let e = submit(&mut c, &key(2), &b, &w0, 0.004, 10).unwrap_err();
    assert!(matches!(e, NodeError::Stale(_)), "{e}");
    assert!(e.to_string().contains("max_staleness = 1"), "{e}");
}
