//! The coordinator's trust rules with an explicit clock: spot checks and their bars,
//! codecs, one upload per lease and re-seeding, heartbeats of closed leases, stalled
//! blocks, invites.
mod common;
use common::*;

#[test]
fn a_failed_spot_check_voids_the_lease_and_bars_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(1, 2);
    cfg.dataset = "shakespeare".into();
    cfg.trust.spot_check_fraction = 1.0;
    let mut c = with_two_workers(dir.path(), cfg);
    let a = lease(&mut c, &key(1), 0);
    let w0 = weights(&c, &key(1), &a);
    // A made-up delta is not what training from this lease's inputs gives.
    let e = submit(&mut c, &key(1), &a, &w0, 0.001, 1).unwrap_err();
    assert!(e.to_string().contains("spot check"), "{e}");
    // No second try on the same lease with other bytes, and no more work at all.
    let e = submit(&mut c, &key(1), &a, &w0, 0.0011, 2).unwrap_err();
    assert!(
        matches!(e, NodeError::Forbidden(_)),
        "barred, not checked again: {e}"
    );
    let e = c.request_work(&key(1), &info(), 3).unwrap_err();
    assert!(
        matches!(e, NodeError::Forbidden(_)) && e.to_string().contains("spot check"),
        "{e}"
    );
    let s = c.status().unwrap();
    assert_eq!(s.flagged.len(), 1);
    assert_eq!(s.flagged[0].key, key(1));
}

#[test]
fn lossier_codecs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_two_workers(dir.path(), tiny(1, 2));
    let a = lease(&mut c, &key(1), 0);
    let w0 = weights(&c, &key(1), &a);
    // The run takes int8: top-k (lossier, and beyond spot checks) is refused.
    let e = submit_as(
        &mut c,
        &key(1),
        &a,
        &w0,
        0.001,
        Codec::TopK { fraction: 0.5 },
        1,
    )
    .unwrap_err();
    assert!(e.to_string().contains("lossier"), "{e}");
}

#[test]
fn receipts_a_crash_left_out_are_issued_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(1, 2);
    {
        let mut c = with_two_workers(dir.path(), cfg.clone());
        let a = lease(&mut c, &key(1), 0);
        let w0 = weights(&c, &key(1), &a);
        let e = c
            .submit_update(&key(1), a.id, &[1, 2, 3], None, None, 1)
            .unwrap_err();
        assert!(!e.to_string().is_empty());
        let _ = w0;
    }
    // Roll the ledger back to before that receipt, as a crash right after the
    // refusal was recorded would leave it.
    let db = rusqlite::Connection::open(dir.path().join("state.sqlite")).unwrap();
    let last: i64 = db
        .query_row("SELECT MAX(idx) FROM ledger", [], |r| r.get(0))
        .unwrap();
    db.execute("DELETE FROM ledger WHERE idx = ?1", [last])
        .unwrap();
    db.execute("DELETE FROM tree_heads WHERE size > ?1", [last])
        .unwrap();
    db.execute("DELETE FROM receipted", []).unwrap();
    drop(db);
    let c = Coordinator::open(dir.path(), None, 5).unwrap();
    let report = blocktrain_train::ledger::verify_all(c.conn()).unwrap();
    assert_eq!(
        report.receipts,
        last as u64 + 1,
        "the refusal's receipt is back"
    );
}

/// The stall found by the crash-safety run: a refused lease's slot was re-leased with
/// the same seed, so the next honest worker computed the identical update and was
/// refused the same way. After a refusal the slot's seed comes from the coordinator's
/// secret; a lapsed lease keeps it (its late upload is still the slot's honest one).
#[test]
fn a_refused_slot_is_reseeded_and_a_lapsed_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_two_workers(dir.path(), tiny(1, 1));
    let a = lease(&mut c, &key(1), 0);
    let junk = b"not an update".to_vec();
    c.submit_update(&key(1), a.id, &junk, None, claim(&key(1), &a, &junk), 1)
        .unwrap_err();
    let b = lease(&mut c, &key(2), 2);
    assert_eq!(
        (b.block, b.shard_index),
        (a.block, a.shard_index),
        "same slot"
    );
    assert_ne!(b.seed, a.seed, "a refusal re-seeds the slot");
    // A second refusal draws yet another seed.
    c.submit_update(&key(2), b.id, &junk, None, claim(&key(2), &b, &junk), 3)
        .unwrap_err();
    let d = lease(&mut c, &key(1), 4);
    assert!(d.seed != a.seed && d.seed != b.seed);

    let dir = tempfile::tempdir().unwrap();
    let mut c = with_two_workers(dir.path(), tiny(1, 1));
    let a = lease(&mut c, &key(1), 0);
    c.tick(10_001).unwrap();
    let b = lease(&mut c, &key(2), 10_002);
    assert_eq!(b.seed, a.seed, "a lapse keeps the slot's draws");
}

#[test]
fn heartbeats_do_not_revive_void_or_retaken_leases() {
    // A lapsed lease whose slot went to another worker stays lapsed.
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_two_workers(dir.path(), tiny(1, 1));
    let a = lease(&mut c, &key(1), 0);
    c.tick(10_001).unwrap();
    let b = lease(&mut c, &key(2), 10_002);
    assert!(!c.heartbeat(&key(1), a.id, 10_003).unwrap());
    assert!(c.heartbeat(&key(2), b.id, 10_003).unwrap());
    assert_eq!(
        c.status().unwrap().blocks[0].active_leases,
        1,
        "the cap holds"
    );
    // A lapsed lease whose slot is still free comes back.
    c.tick(20_004).unwrap();
    assert!(c.heartbeat(&key(2), b.id, 20_005).unwrap());

    // A spot check's void lease and its flagged worker stay out.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(1, 2);
    cfg.dataset = "shakespeare".into();
    cfg.trust.spot_check_fraction = 1.0;
    let mut c = with_two_workers(dir.path(), cfg);
    let a = lease(&mut c, &key(1), 0);
    let w0 = weights(&c, &key(1), &a);
    submit(&mut c, &key(1), &a, &w0, 0.001, 1).unwrap_err();
    assert!(!c.heartbeat(&key(1), a.id, 2).unwrap());
    assert_eq!(c.status().unwrap().blocks[0].active_leases, 0);
}

#[test]
fn a_spot_check_that_cannot_run_refuses_without_blame() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(1, 2);
    cfg.dataset = "shakespeare".into();
    cfg.trust.spot_check_fraction = 1.0;
    let mut c = with_two_workers(dir.path(), cfg);
    let a = lease(&mut c, &key(1), 0);
    let w0 = weights(&c, &key(1), &a);
    // The checkpoint the recomputation starts from is gone (disk trouble).
    let (path, _) = c.checkpoint_file(&key(1), &a.weights_hash).unwrap();
    std::fs::remove_file(path).unwrap();
    let e = submit(&mut c, &key(1), &a, &w0, 0.001, 1).unwrap_err();
    assert!(e.to_string().contains("could not run"), "{e}");
    assert!(e.to_string().contains("not accepted unverified"), "{e}");
    let s = c.status().unwrap();
    assert_eq!(s.updates.get("applied").copied().unwrap_or(0), 0);
    assert!(s.flagged.is_empty(), "not the worker's fault");
    assert!(c.request_work(&key(1), &info(), 2).is_ok());
}

#[test]
fn a_block_nobody_advances_is_marked_stalled_until_it_moves() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_two_workers(dir.path(), tiny(1, 1));
    let stall = c.stall_ms();
    assert_eq!(
        stall, 300_000,
        "3 x the longer of round timeout and lease life"
    );
    c.tick(stall - 1000).unwrap();
    assert!(!c.status().unwrap().blocks[0].stalled);
    c.tick(stall + 1).unwrap();
    assert!(c.status().unwrap().blocks[0].stalled);
    let a = lease(&mut c, &key(1), stall + 2);
    let w0 = weights(&c, &key(1), &a);
    submit(&mut c, &key(1), &a, &w0, 0.001, stall + 3).unwrap();
    c.tick(stall + 2000).unwrap();
    assert!(!c.status().unwrap().blocks[0].stalled);
}

#[test]
fn an_invite_belongs_to_the_first_key_that_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(1, 1);
    cfg.auth.invites = vec!["invite-for-alice".into()];
    let mut c = Coordinator::open(dir.path(), Some(cfg), 0).unwrap();
    let reg = |k: &str, token: Option<&str>| RegisterRequest {
        info: info(),
        join_proof: token.map(|t| join_proof(t, k)),
    };
    c.register(&key(1), &reg(&key(1), Some("invite-for-alice")), 1)
        .unwrap();
    // Alice again (a restart): fine. Anyone else with her token, or none: refused.
    c.register(&key(1), &reg(&key(1), Some("invite-for-alice")), 2)
        .unwrap();
    let e = c
        .register(&key(2), &reg(&key(2), Some("invite-for-alice")), 3)
        .unwrap_err();
    assert!(matches!(e, NodeError::Forbidden(_)) && e.to_string().contains("belongs to"));
    let e = c.register(&key(3), &reg(&key(3), None), 4).unwrap_err();
    assert!(e.to_string().contains("invite"), "{e}");
}

#[test]
fn own_data_buys_no_immunity_check_leases_are_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(1, 2);
    cfg.dataset = "shakespeare".into();
    cfg.trust.spot_check_fraction = 1.0;
    let mut c = Coordinator::open(dir.path(), Some(cfg), 0).unwrap();
    let mut own = info();
    own.data = Some(blocktrain_protocol::wire::DataShard {
        blake3: "cd".repeat(32),
        bytes: 1 << 20,
    });
    c.register(
        &key(1),
        &RegisterRequest {
            info: own.clone(),
            join_proof: None,
        },
        0,
    )
    .unwrap();
    let l = match c.request_work(&key(1), &own, 1).unwrap() {
        WorkReply::Lease(l) => l,
        other => panic!("{other:?}"),
    };
    // Sampled at the spot-check fraction (all, here): trained on the run's shard...
    assert!(l.public_shard, "{l:?}");
    // ...and recomputed: a made-up delta is caught, though the worker has its own data.
    let w0 = weights(&c, &key(1), &l);
    let e = submit(&mut c, &key(1), &l, &w0, 0.001, 2).unwrap_err();
    assert!(e.to_string().contains("spot check"), "{e}");
    assert_eq!(c.status().unwrap().flagged.len(), 1);

    // With spot checks off, an own-data worker trains on its own data.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(1, 2);
    cfg.trust.spot_check_fraction = 0.0;
    let mut c = Coordinator::open(dir.path(), Some(cfg), 0).unwrap();
    c.register(
        &key(1),
        &RegisterRequest {
            info: own.clone(),
            join_proof: None,
        },
        0,
    )
    .unwrap();
    match c.request_work(&key(1), &own, 1).unwrap() {
        WorkReply::Lease(l) => assert!(!l.public_shard),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_second_upload_while_the_first_is_vetted_is_refused_and_records_nothing() {
    use blocktrain_train::coordinator::Admitted;
    let dir = tempfile::tempdir().unwrap();
    let mut c = with_two_workers(dir.path(), tiny(1, 2));
    let a = lease(&mut c, &key(1), 0);
    let w0 = weights(&c, &key(1), &a);
    let body = codec::encode(&filled(&w0, 0.001), Codec::Fp32);
    let other = codec::encode(&filled(&w0, 0.002), Codec::Fp32);
    let first = c
        .admit_update(
            &key(1),
            a.id,
            body.clone(),
            None,
            claim(&key(1), &a, &body),
            1,
        )
        .unwrap();
    let Admitted::Vet(job) = first else {
        panic!("expected a vetting job")
    };
    // While it is vetted (off the lock), another upload on the lease is refused.
    let e = c
        .admit_update(
            &key(1),
            a.id,
            other.clone(),
            None,
            claim(&key(1), &a, &other),
            2,
        )
        .unwrap_err();
    assert!(
        matches!(e, NodeError::Busy(_)) && e.to_string().contains("being vetted"),
        "{e}"
    );
    assert_eq!(
        c.status()
            .unwrap()
            .updates
            .get("rejected")
            .copied()
            .unwrap_or(0),
        0
    );
    // The first is decided once; then the lease is delivered.
    c.decide(job.run(), 3).unwrap();
    assert_eq!(c.status().unwrap().updates["pending"], 1);
    let e = c
        .submit_update(&key(1), a.id, &other, None, claim(&key(1), &a, &other), 4)
        .unwrap_err();
    assert!(e.to_string().contains("delivered"), "{e}");
}
