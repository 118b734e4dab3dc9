//! The coordinator's rules with an explicit clock: assignment, round close, lease
//! expiry, the stale rule, validation of bad updates, restart, authentication.
mod common;
use common::*;

#[test]
fn assignment_fills_the_emptiest_block_then_waits() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::open(dir.path(), Some(tiny(2, 2)), 0).unwrap();
    for i in 0..5 {
        join(&mut c, &key(i));
    }
    let blocks: Vec<usize> = (0..4).map(|i| lease(&mut c, &key(i), 1).block).collect();
    assert_eq!(blocks, vec![0, 1, 0, 1]);
    assert!(matches!(
        c.request_work(&key(4), &info(), 1).unwrap(),
        WorkReply::Wait { .. }
    ));
    // Asking again returns the lease already held (a lost reply costs nothing).
    let again = lease(&mut c, &key(0), 2);
    assert_eq!(again.block, 0);
    let l2 = lease(&mut c, &key(2), 2);
    assert_ne!(
        again.shard_index, l2.shard_index,
        "two workers of a round get different shards"
    );
}

#[test]
fn round_closes_with_the_mean_of_its_updates() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_two_workers(dir.path(), tiny(1, 2));
    let (a, b) = (lease(&mut c, &key(1), 0), lease(&mut c, &key(2), 0));
    let w0 = weights(&c, &key(1), &a);
    let body = codec::encode(&filled(&w0, 0.001), Codec::Fp32);
    let r = c
        .submit_update(
            &key(1),
            a.id,
            &body,
            Some(1.0),
            claim(&key(1), &a, &body),
            5,
        )
        .unwrap();
    assert_eq!(r.block_version, 0, "waits for the second lease");
    let body = codec::encode(&filled(&w0, 0.003), Codec::Fp32);
    let r = c
        .submit_update(
            &key(2),
            b.id,
            &body,
            Some(1.0),
            claim(&key(2), &b, &body),
            6,
        )
        .unwrap();
    assert_eq!(r.block_version, 1);
    let l = lease(&mut c, &key(1), 7);
    assert_eq!(l.version, 1);
    let w1 = weights(&c, &key(1), &l);
    for (n, a) in &w1 {
        for (x, y) in a.data.iter().zip(&w0[n].data) {
            assert!((x - y - 0.002).abs() < 1e-6, "{n}: mean delta is 0.002");
        }
    }
    assert_eq!(c.history(0).unwrap().len(), 2);
}

#[test]
fn lapsed_lease_frees_its_slot_and_a_late_update_still_counts() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_two_workers(dir.path(), tiny(1, 1));
    let a = lease(&mut c, &key(1), 0);
    assert!(matches!(
        c.request_work(&key(2), &info(), 1000).unwrap(),
        WorkReply::Wait { .. }
    ));
    // No heartbeat for lease_secs: the slot (and its shard) goes to the next worker.
    let b = lease(&mut c, &key(2), 10_001);
    assert_eq!((b.block, b.version, b.shard_index), (0, 0, a.shard_index));
    // The first worker was only slow: its update for the still-open round is merged.
    let w0 = weights(&c, &key(1), &a);
    let r = submit_as(&mut c, &key(1), &a, &w0, 0.01, Codec::Fp16, 10_002).unwrap();
    assert_eq!(r, 1, "quorum of one");
    let e = submit_as(&mut c, &key(2), &b, &w0, 0.01, Codec::Fp16, 10_003).unwrap_err();
    assert!(matches!(e, NodeError::Stale(_)), "{e}");
}

#[test]
fn quorum_waits_for_every_worker_of_the_round_until_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_two_workers(dir.path(), tiny(1, 2));
    let a = lease(&mut c, &key(1), 0);
    let w0 = weights(&c, &key(1), &a);
    submit(&mut c, &key(1), &a, &w0, 0.001, 5).unwrap();
    // The second worker has not even asked yet: the round waits for it.
    c.tick(50_000).unwrap();
    assert_eq!(c.status().unwrap().blocks[0].version, 0);
    let b = lease(&mut c, &key(2), 50_001);
    assert_ne!(a.shard_index, b.shard_index);
    // (Not byte-identical to the first: identical bytes would be refused as a replay.)
    submit(&mut c, &key(2), &b, &w0, 0.002, 50_002).unwrap();
    assert_eq!(c.status().unwrap().blocks[0].version, 1);
    assert_eq!(c.status().unwrap().updates["applied"], 2);
}

#[test]
fn dead_worker_round_closes_at_its_deadline_and_stale_update_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_two_workers(dir.path(), tiny(1, 2));
    let (a, b) = (lease(&mut c, &key(1), 0), lease(&mut c, &key(2), 0));
    let w0 = weights(&c, &key(1), &a);
    submit(&mut c, &key(1), &a, &w0, 0.01, 5).unwrap();
    // Worker 2 died: its lease lapses, and at the round's deadline the round closes
    // with worker 1's update alone.
    c.tick(10_001).unwrap();
    assert_eq!(c.status().unwrap().blocks[0].version, 0);
    c.tick(100_005).unwrap();
    assert_eq!(c.status().unwrap().blocks[0].version, 1);
    let before = head_hash(&c, 0);
    let e = submit_as(&mut c, &key(2), &b, &w0, 0.01, Codec::Fp32, 100_006).unwrap_err();
    assert!(matches!(e, NodeError::Stale(_)), "{e}");
    assert!(e.to_string().contains("version 1"), "{e}");
    assert_eq!(head_hash(&c, 0), before);
    let s = c.status().unwrap();
    assert!(s.recent[0].reason.as_deref().unwrap().contains("stale"));
}

#[test]
fn bad_updates_are_rejected_with_reasons_and_leave_checkpoints_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_two_workers(dir.path(), tiny(1, 1));
    let a = lease(&mut c, &key(1), 0);
    let w0 = weights(&c, &key(1), &a);
    let before = head_hash(&c, 0);
    let (first, _) = w0.iter().next().unwrap();
    let mut wrong_shape = filled(&w0, 0.0);
    wrong_shape.get_mut(first).unwrap().shape.push(1);
    let mut nan = filled(&w0, 0.0);
    nan.get_mut(first).unwrap().data[0] = f32::NAN;
    let mut missing = filled(&w0, 0.0);
    missing.remove(first);
    let mut inf = filled(&w0, 0.0);
    inf.get_mut(first).unwrap().data[0] = f32::INFINITY;
    // fp16 tensors labelled fp32 (same header length): the dtype check must catch it.
    let mislabelled: Vec<u8> = {
        let mut b = codec::encode(&filled(&w0, 0.0), Codec::Fp16);
        let at = b.windows(4).position(|w| w == b"fp16").unwrap();
        b[at..at + 4].copy_from_slice(b"fp32");
        b
    };
    let huge = filled(&w0, 1e3);
    let good = codec::encode(&filled(&w0, 1e-4), Codec::Fp16);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (codec::encode(&wrong_shape, Codec::Fp32), "shape"),
        (codec::encode(&nan, Codec::Fp32), "NaN"),
        (codec::encode(&inf, Codec::Fp32), "Inf"),
        (mislabelled, "dtype"),
        (codec::encode(&missing, Codec::Fp32), "differ"),
        (codec::encode(&huge, Codec::Fp16), "RMS"),
        // A zero delta with a valid claim: credit for no work.
        (
            codec::encode(&filled(&w0, 0.0), Codec::Fp16),
            "empty update",
        ),
        (good[..good.len() / 2].to_vec(), "safetensors"),
        (vec![0u8; 1 << 24], "limit"),
    ];
    // One upload per lease: each bad one is refused on a lease of its own.
    let mut leases = vec![a];
    for (i, (body, why)) in cases.iter().enumerate() {
        if i > 0 {
            leases.push(lease(&mut c, &key(1), 1));
        }
        let l = leases.last().unwrap();
        let e = c
            .submit_update(&key(1), l.id, body, None, claim(&key(1), l, body), 1)
            .unwrap_err();
        assert!(e.to_string().contains(why), "expected '{why}' in: {e}");
    }
    let receipts = blocktrain_train::ledger::Ledger::entries(c.conn())
        .unwrap()
        .len();
    assert_eq!(receipts, cases.len(), "one receipt per refused lease");
    // A refused lease takes no second upload, and the retry leaves no row or receipt.
    let refused = &leases[0];
    let e = c
        .submit_update(
            &key(1),
            refused.id,
            &good,
            None,
            claim(&key(1), refused, &good),
            1,
        )
        .unwrap_err();
    assert!(e.to_string().contains("one upload"), "{e}");
    // Someone else's lease, and a lease that does not exist: refused, nothing recorded.
    let last = leases.last().unwrap();
    let e = c
        .submit_update(
            &key(2),
            last.id,
            &good,
            None,
            claim(&key(2), last, &good),
            1,
        )
        .unwrap_err();
    assert!(matches!(e, NodeError::Forbidden(_)), "{e}");
    assert!(matches!(
        c.submit_update(&key(1), 999, &good, None, claim(&key(1), last, &good), 1)
            .unwrap_err(),
        NodeError::NotFound(_)
    ));
    let s = c.status().unwrap();
    assert_eq!(s.updates["rejected"], cases.len() as u64);
    assert_eq!(
        blocktrain_train::ledger::Ledger::entries(c.conn())
            .unwrap()
            .len(),
        receipts
    );
    assert!(s.recent.iter().all(|u| u.reason.is_some()));
    assert_eq!(head_hash(&c, 0), before);
    assert_eq!(s.blocks[0].version, 0);
    // A new lease takes a good update.
    let fresh = lease(&mut c, &key(1), 2);
    c.submit_update(
        &key(1),
        fresh.id,
        &good,
        None,
        claim(&key(1), &fresh, &good),
        2,
    )
    .unwrap();
    assert_eq!(c.status().unwrap().blocks[0].version, 1);
}

#[test]
fn restart_keeps_versions_and_pending_updates() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(1, 2);
    let (a, w0) = {
        let mut c = Coordinator::open(dir.path(), Some(cfg.clone()), 0).unwrap();
        join(&mut c, &key(1));
        join(&mut c, &key(2));
        let a = lease(&mut c, &key(1), 0);
        let _b = lease(&mut c, &key(2), 0);
        let w0 = weights(&c, &key(1), &a);
        submit(&mut c, &key(1), &a, &w0, 0.01, 5).unwrap();
        (a, w0)
    };
    // Reopen without the config: the stored run resumes; its pending update is still there.
    let mut c = Coordinator::open(dir.path(), None, 20_000).unwrap();
    assert_eq!(c.status().unwrap().blocks[0].pending_updates, 1);
    // The worker re-sends (its reply was lost): the same update, not a second one.
    let body = codec::encode(&filled(&w0, 0.01), Codec::Fp32);
    let again = c
        .submit_update(
            &key(1),
            a.id,
            &body,
            None,
            claim(&key(1), &a, &body),
            20_001,
        )
        .unwrap();
    assert_eq!(
        c.status().unwrap().blocks[0].pending_updates,
        1,
        "{again:?}"
    );
    let e = submit_as(&mut c, &key(1), &a, &w0, 0.02, Codec::Fp32, 20_002).unwrap_err();
    assert!(e.to_string().contains("already delivered"), "{e}");
    c.tick(200_000).unwrap();
    assert_eq!(
        c.status().unwrap().blocks[0].version,
        1,
        "deadline closes the round"
    );
    assert_eq!(c.status().unwrap().updates["applied"], 1);
    drop(c);
    let mut other = cfg.clone();
    other.seed = 9;
    let e = Coordinator::open(dir.path(), Some(other), 0).unwrap_err();
    assert!(e.to_string().contains("other settings"), "{e}");
}

#[test]
fn run_is_done_after_its_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::open(dir.path(), Some(tiny(1, 1)), 0).unwrap();
    join(&mut c, &key(1));
    for round in 0..3 {
        let l = lease(&mut c, &key(1), round * 10);
        let w = weights(&c, &key(1), &l);
        submit_as(
            &mut c,
            &key(1),
            &l,
            &w,
            0.001 * (1.0 + round as f32), // distinct bodies: identical ones are replays
            Codec::Int8 { chunk: 64 },
            round * 10 + 1,
        )
        .unwrap();
    }
    assert_eq!(
        c.request_work(&key(1), &info(), 100).unwrap(),
        WorkReply::Done
    );
    assert!(c.status().unwrap().done);
}

#[test]
fn join_secret_and_allowlist_admit_only_their_workers() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(1, 1);
    cfg.auth.join_secret = Some("hunter2".into());
    cfg.auth.allow = vec![key(1), key(2)];
    let mut c = Coordinator::open(dir.path(), Some(cfg), 0).unwrap();
    let req = |k: &str, secret: &str| RegisterRequest {
        info: info(),
        join_proof: Some(join_proof(secret, k)),
    };
    c.register(&key(1), &req(&key(1), "hunter2"), 0).unwrap();
    let e = c.register(&key(2), &req(&key(2), "wrong"), 0).unwrap_err();
    assert!(e.to_string().contains("join secret"), "{e}");
    let e = c
        .register(&key(3), &req(&key(3), "hunter2"), 0)
        .unwrap_err();
    assert!(e.to_string().contains("allowlist"), "{e}");
    let e = c.request_work(&key(3), &info(), 0).unwrap_err();
    assert!(
        matches!(e, NodeError::Unauthenticated(_)) && e.to_string().contains("register"),
        "{e}"
    );
}

#[test]
fn a_kill_during_first_start_is_repaired_on_the_next() {
    let dir = tempfile::tempdir().unwrap();
    drop(Coordinator::open(dir.path(), Some(tiny(3, 1)), 0).unwrap());
    // As if killed after block 1's version 0 was committed, before blocks 2 and 3.
    let db = rusqlite::Connection::open(dir.path().join("state.sqlite")).unwrap();
    db.execute("DELETE FROM blocks WHERE block > 0", [])
        .unwrap();
    db.execute("DELETE FROM versions WHERE block > 0", [])
        .unwrap();
    drop(db);
    let mut c = Coordinator::open(dir.path(), None, 1).unwrap();
    assert_eq!(c.status().unwrap().blocks.len(), 3);
    join(&mut c, &key(1));
    c.tick(2).unwrap();
    assert_eq!(lease(&mut c, &key(1), 3).version, 0);
}

#[test]
fn a_worker_without_the_memory_for_any_block_is_told_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::open(dir.path(), Some(tiny(1, 1)), 0).unwrap();
    join(&mut c, &key(1));
    let small = WorkerInfo {
        memory_bytes: 64 << 20,
        ..info()
    };
    let e = c.request_work(&key(1), &small, 0).unwrap_err();
    assert!(e.to_string().contains("free memory"), "{e}");
    let big = WorkerInfo {
        memory_bytes: 8 << 30,
        ..info()
    };
    assert!(matches!(
        c.request_work(&key(1), &big, 0).unwrap(),
        WorkReply::Lease(_)
    ));
}
