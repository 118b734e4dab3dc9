//! Stale updates (`max_staleness`): which versions' updates join the current round, the
//! leases a commit keeps open, their slots, and what a rebuild restores.
use blocktrain_protocol::wire::WorkerInfo;

use super::*;

/// One block, `per_block` workers, a quorum of one, max_staleness `k`.
fn stale_rules(per_block: u32, k: u64) -> Rules {
    let mut r = rules(1, per_block);
    r.quorum = 1;
    r.max_staleness = k;
    r
}

fn stale_message(e: crate::Result<()>) -> String {
    match e {
        Err(NodeError::Stale(m)) => m,
        other => panic!("expected stale, got {other:?}"),
    }
}

/// One block with `per_block` slots and max_staleness `k`, `workers` joined (a, b, ...),
/// and a and b each holding a lease of version 0.
fn a_and_b_leased(per_block: u32, k: u64, workers: &[&str]) -> (Core, LeaseRow, LeaseRow) {
    let mut core = fresh(stale_rules(per_block, k));
    for w in workers {
        join(&mut core, w);
    }
    let (a, b) = (lease(&mut core, "a", 0), lease(&mut core, "b", 0));
    (core, a, b)
}

/// Two slots, K = 1, workers a, b and c: a delivers and round 0 commits, b's lease of
/// version 0 is kept open into round 1.
fn b_kept_past_one_commit() -> (Core, LeaseRow) {
    let (mut core, a, b) = a_and_b_leased(2, 1, &["a", "b", "c"]);
    core.accept(0, pending(1, &a, 1), 1);
    core.committed(0, 1, "wire1", 2);
    (core, b)
}

#[test]
fn an_update_within_max_staleness_joins_the_current_round() {
    let (mut core, a, b) = a_and_b_leased(2, 1, &["a", "b"]);
    core.accept(0, pending(1, &a, 1), 1);
    core.committed(0, 1, "wire1", 2);
    // b's lease (version 0) is one version behind, within K = 1: still current.
    assert_eq!(core.lease(b.id).map(|l| l.version), Some(0));
    assert!(core.lease_open(&b).is_ok());
    assert!(!core.round_ready(0, 3));
    core.accept(0, pending(2, &b, 3), 3);
    assert_eq!(core.pending(0)[0].base, 0);
    // It counts toward the quorum of round 1 (a quorum of one: ready at once).
    assert!(core.round_ready(0, 3));
    assert!(matches!(
        core.lease_open(&b),
        Err(NodeError::Rejected(m)) if m.contains("already delivered")
    ));
}

#[test]
fn an_update_more_than_max_staleness_old_is_stale_and_names_the_setting() {
    for k in [0, 1] {
        let (mut core, a, b) = a_and_b_leased(2, k, &["a", "b"]);
        core.accept(0, pending(1, &a, 1), 1);
        core.committed(0, 1, "wire1", 2);
        if k == 0 {
            // Today's rule: the old round's leases are gone at its commit.
            assert_eq!(core.lease(b.id), None);
            let m = stale_message(core.lease_open(&b));
            assert!(m.contains("max_staleness = 0"), "{m}");
            continue;
        }
        join(&mut core, "c");
        let c = lease(&mut core, "c", 3);
        core.accept(0, pending(2, &c, 4), 4);
        core.committed(0, 2, "wire2", 5);
        // Two versions behind with K = 1: no longer current, and refused as stale.
        assert_eq!(core.lease(b.id), None);
        let m = stale_message(core.lease_open(&b));
        assert!(
            m.contains("version 2") && m.contains("version 0") && m.contains("max_staleness = 1"),
            "{m}"
        );
        assert_eq!(
            core.heartbeat("b", b.id, 6).unwrap(),
            Beat::NotCurrent,
            "the shell answers it from the journal: not wanted"
        );
    }
}

#[test]
fn an_open_lease_survives_one_commit_with_k_1_and_is_superseded_at_the_second() {
    let (mut core, a, b) = a_and_b_leased(2, 1, &["a", "b"]);
    core.accept(0, pending(1, &a, 1), 1);
    core.committed(0, 1, "wire1", 2);
    // Still b's: renewed and handed back on a retried work request with its own
    // version's copy. Once it lapses it stays lapsed (it may no longer deliver).
    assert_eq!(core.heartbeat("b", b.id, 3).unwrap(), Beat::Wanted(true));
    match core.work("b", &WorkerInfo::new("cpu"), 4, true).unwrap() {
        Work::Lease(l, false) => {
            assert_eq!(l.id, b.id);
            assert_eq!(core.lease_reply(&l).weights_hash, "wire0");
            assert_eq!(core.lease_reply(&l).schedule_step, 0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(core.lapse(13_003), 1);
    assert_eq!(
        core.heartbeat("b", b.id, 13_004).unwrap(),
        Beat::Wanted(false)
    );
    // The second commit drops it from the core, its worker told to stop and free for
    // new work.
    let a2 = lease(&mut core, "a", 13_005);
    assert_eq!(core.lease_reply(&a2).weights_hash, "wire1");
    core.accept(0, pending(2, &a2, 13_006), 13_006);
    core.committed(0, 2, "wire2", 13_007);
    assert_eq!(core.lease(b.id), None);
    assert_eq!(core.heartbeat("b", b.id, 13_008).unwrap(), Beat::NotCurrent);
    let next = lease(&mut core, "b", 13_009);
    assert_eq!(
        (next.version, core.lease_reply(&next).weights_hash.as_str()),
        (2, "wire2")
    );
}

#[test]
fn an_open_old_lease_keeps_its_slot_so_the_block_is_not_over_leased() {
    let (mut core, a, b) = a_and_b_leased(2, 1, &["a", "b", "c", "d"]);
    assert_eq!((a.slot, b.slot), (0, 1));
    core.accept(0, pending(1, &a, 1), 1);
    core.committed(0, 1, "wire1", 2);
    assert_eq!(core.active_leases(0), 1, "b's lease of version 0");
    // One slot is free in round 1: slot 0 (b holds 1 and its shard), then the block is full.
    let c = lease(&mut core, "c", 3);
    assert_eq!((c.version, c.slot), (1, 0));
    assert_eq!(
        core.work("d", &WorkerInfo::new("cpu"), 3, true).unwrap(),
        Work::Wait
    );
    // b's stale update fills its place in round 1 as a delivered update does.
    core.accept(0, pending(2, &b, 4), 4);
    assert_eq!(
        core.work("d", &WorkerInfo::new("cpu"), 4, true).unwrap(),
        Work::Wait
    );
    // A refused old lease frees its slot, and the seed of slot 1 at version 1 is the
    // plain one: refusals at other versions do not re-seed it.
    let (mut core, b) = b_kept_past_one_commit();
    assert_eq!(core.refuse(b.id, false), Some(lease_state::REFUSED));
    let (c, b2) = (lease(&mut core, "c", 3), lease(&mut core, "b", 3));
    assert_eq!((c.slot, b2.slot), (0, 1));
    assert_eq!(b2.seed, seed_of(7, 0, 1, 1));
}

#[test]
fn an_old_lease_that_lapses_after_the_commit_may_not_deliver() {
    let (mut core, b) = b_kept_past_one_commit();
    join(&mut core, "d");
    assert!(core.lease_open(&b).is_ok(), "kept: active, one version old");
    // b's worker goes quiet past its lease: it lapses, and its slot is leased again.
    let late = u64::MAX / 2;
    assert_eq!(core.lapse(late), 1);
    let (c, d) = (lease(&mut core, "c", late), lease(&mut core, "d", late));
    assert_eq!((c.version, c.slot, d.version, d.slot), (1, 0, 1, b.slot));
    // A late upload on the lapsed lease would train the shard d now holds, and a late
    // heartbeat does not bring it back either.
    let m = stale_message(core.lease_open(&b));
    assert!(m.contains("lapsed"), "{m}");
    assert!(matches!(
        core.heartbeat("b", b.id, late),
        Ok(Beat::Wanted(false))
    ));
}

/// An older version's lapsed lease stays lapsed even when its slot is free: a heartbeat
/// does not revive it, as the journal's rebuild would not.
#[test]
fn a_heartbeat_does_not_revive_a_lapsed_lease_kept_past_a_commit() {
    let (mut core, b) = b_kept_past_one_commit();
    let late = u64::MAX / 2;
    assert_eq!(core.lapse(late), 1);
    assert!(matches!(
        core.heartbeat("b", b.id, late),
        Ok(Beat::Wanted(false))
    ));
    assert_eq!(core.lease(b.id).unwrap().state, lease_state::EXPIRED);
}

/// A lapse the core holds only as soft state, of a lease the next commit drops, still
/// reaches the journal: the commit supersedes there only leases outside max_staleness,
/// so an unwritten lapse would come back active at the next start.
#[test]
fn a_lapse_a_commit_drops_is_still_written() {
    let (mut core, a, b) = a_and_b_leased(2, 1, &["a", "b"]);
    let _ = core.take_soft();
    let late = b.expires_ms + 1;
    assert_eq!(core.lapse(late), 2);
    core.accept(0, pending(1, &a, late), late);
    core.committed(0, 1, "wire1", late);
    assert_eq!(core.lease(b.id), None, "lapsed: not kept into round 1");
    let soft = core.take_soft();
    assert!(
        soft.leases
            .iter()
            .any(|(id, state, _)| *id == b.id && state == lease_state::EXPIRED),
        "{soft:?}"
    );
    assert!(core.take_soft().leases.is_empty(), "written once");
    // A write that failed gives it back, to be written at the next try.
    core.restore_soft(soft.clone());
    assert_eq!(core.take_soft(), soft);
}

#[test]
fn a_closing_round_holds_stale_uploads_too() {
    let (mut core, a, b) = a_and_b_leased(3, 1, &["a", "b", "c"]);
    core.accept(0, pending(1, &a, 1), 1);
    core.committed(0, 1, "wire1", 2);
    let c = lease(&mut core, "c", 3);
    core.accept(0, pending(2, &c, 4), 4);
    assert!(core.begin_close(0, 5));
    // The merge took the round's pending updates: b's would be lost, so it waits.
    assert!(matches!(core.lease_open(&b), Err(NodeError::Busy(_))));
    core.abort_close(0);
    assert!(core.lease_open(&b).is_ok());
}

#[test]
fn a_rebuild_restores_open_stale_leases_and_pending_stale_updates() {
    let lease_at = |id: i64, version: u64, slot: u32, state: &str, worker: &str| LeaseRow {
        id,
        worker: worker.into(),
        block: 0,
        version,
        slot,
        steps: 8,
        seed: 1,
        issued_ms: 0,
        expires_ms: 5_000,
        state: state.into(),
        public: false,
    };
    let stale = |update: i64, lease: i64, base: u64| Pending {
        update,
        lease: Some(lease),
        hash: format!("h{update}"),
        steps: 8,
        received_ms: 100,
        base,
    };
    let from = Rebuild {
        workers: ["a", "b", "c", "d", "e", "f"]
            .into_iter()
            .map(|k| (k.to_string(), WorkerState::default()))
            .collect(),
        // Block at version 3, K = 2: versions 1..=3 are in the window.
        blocks: vec![(3, "wire3".into(), 0)],
        old_wires: vec![(0, 1, "wire1".into()), (0, 2, "wire2".into())],
        leases: vec![
            lease_at(1, 1, 0, lease_state::ACTIVE, "a"), // open, two versions old: kept
            lease_at(2, 2, 1, lease_state::DELIVERED, "b"), // delivered into round 3: kept
            lease_at(3, 2, 2, lease_state::DELIVERED, "c"), // delivered into round 2: dropped
            lease_at(4, 2, 2, lease_state::REFUSED, "d"), // closed: left to the journal
            lease_at(5, 3, 2, lease_state::EXPIRED, "e"), // this round's, lapsed: kept
            lease_at(0, 2, 0, lease_state::EXPIRED, "d"), // older, lapsed: dropped
        ],
        decided: vec![2, 3, 4],
        pending: vec![(0, stale(10, 2, 2))],
        last_lease: 5,
        ..Default::default()
    };
    let mut r = rules(1, 3);
    r.max_staleness = 2;
    r.rounds = 6;
    let mut core = Core::new(r, secrets(1), from, 50_000);
    assert_eq!(
        core.lease(1).map(|l| (l.version, l.expires_ms)),
        Some((1, 60_000)),
        "kept, with a fresh life"
    );
    assert_eq!(
        core.lease_reply(core.lease(1).unwrap()).weights_hash,
        "wire1"
    );
    assert!(core.lease_open(core.lease(1).unwrap()).is_ok());
    assert!(core.is_decided(2));
    assert_eq!(core.lease(3), None);
    assert_eq!(core.lease(4), None);
    assert_eq!(
        core.lease(0),
        None,
        "an older lapsed lease may not deliver: not restored"
    );
    assert_eq!(core.lease(5).unwrap().state, lease_state::EXPIRED);
    assert_eq!(core.pending(0), &[stale(10, 2, 2)][..]);
    // Slots 0 (a, active) and 1 (b's pending update) are taken, 2 is free (e lapsed).
    let f = lease(&mut core, "f", 50_001);
    assert_eq!((f.version, f.slot, f.id), (3, 2, 6));
    // Without the older wires nothing older than the current version can be served: those
    // leases are not restored (they would be stale).
    let from = Rebuild {
        workers: [("a".to_string(), WorkerState::default())].into(),
        blocks: vec![(3, "wire3".into(), 0)],
        leases: vec![lease_at(1, 2, 0, lease_state::ACTIVE, "a")],
        last_lease: 1,
        ..Default::default()
    };
    let mut r = rules(1, 3);
    r.max_staleness = 2;
    let core = Core::new(r, secrets(1), from, 0);
    assert_eq!(core.lease(1), None);
}
