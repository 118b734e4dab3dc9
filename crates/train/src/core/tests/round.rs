//! Rounds, refusals, rebuilds, soft state and stalls.
use std::collections::HashMap;

use blocktrain_protocol::wire::WorkerInfo;

use super::*;

#[test]
fn a_refusal_closes_the_lease_and_reseeds_its_slot_from_the_secret() {
    let run = |k: u8| {
        let blocks = vec![(0, "w".to_string(), 0)];
        let from = Rebuild {
            blocks,
            ..Default::default()
        };
        let mut core = Core::new(rules(1, 1), secrets(k), from, 0);
        join(&mut core, "a");
        let first = lease(&mut core, "a", 0);
        assert_eq!(core.refuse(first.id, false), Some(lease_state::REFUSED));
        assert_eq!(core.refuse(first.id, false), None, "decided once");
        assert!(core.is_decided(first.id));
        assert!(matches!(
            core.lease_open(&first),
            Err(NodeError::Rejected(_))
        ));
        let second = lease(&mut core, "a", 1);
        assert_eq!(second.slot, first.slot);
        assert_ne!(second.seed, first.seed, "the slot is re-seeded");
        second.seed
    };
    assert_ne!(
        run(1),
        run(9),
        "the new seed follows the coordinator's secret"
    );
}

#[test]
fn a_round_closes_at_its_quorum_or_its_deadline_and_the_next_one_opens() {
    let mut core = fresh(rules(1, 2));
    join(&mut core, "a");
    join(&mut core, "b");
    let (a, b) = (lease(&mut core, "a", 0), lease(&mut core, "b", 0));
    assert!(!core.round_ready(0, 0));
    core.accept(0, pending(1, &a, 1_000), 1_000);
    assert!(
        !core.round_ready(0, 30_999),
        "one of two, before the deadline"
    );
    assert!(
        core.round_ready(0, 31_000),
        "the deadline counts from the first update"
    );
    assert!(matches!(core.lease_open(&a), Err(NodeError::Rejected(_))));
    core.accept(0, pending(2, &b, 2_000), 2_000);
    assert!(core.round_ready(0, 2_000));
    assert_eq!(core.ready_rounds(2_000), vec![0]);
    core.committed(0, 1, "wire1", 2_500);
    assert_eq!(core.version(0), 1);
    assert!(core.pending(0).is_empty());
    assert_eq!(
        core.lease(a.id),
        None,
        "the old round's leases are not current"
    );
    let next = lease(&mut core, "a", 3_000);
    assert_eq!((next.version, next.slot), (1, 0));
    assert_eq!(core.lease_reply(&next).weights_hash, "wire1");
    assert_eq!(core.lease_reply(&next).schedule_step, 8);
}

#[test]
fn the_run_is_done_when_every_block_has_its_rounds() {
    let mut r = rules(1, 1);
    r.rounds = 1;
    let mut core = fresh(r);
    join(&mut core, "a");
    let l = lease(&mut core, "a", 0);
    core.accept(0, pending(1, &l, 1), 1);
    core.committed(0, 1, "w1", 2);
    assert!(core.done());
    assert_eq!(
        core.work("a", &WorkerInfo::new("cpu"), 3, false).unwrap(),
        Work::Done
    );
}

#[test]
fn a_rebuilt_core_keeps_leases_decisions_and_pending_updates_of_open_rounds() {
    let lease_at = |id: i64, version: u64, state: &str, worker: &str| LeaseRow {
        id,
        worker: worker.into(),
        block: 0,
        version,
        slot: id as u32 % 2,
        steps: 8,
        seed: 1,
        issued_ms: 0,
        expires_ms: 5_000,
        state: state.into(),
        public: false,
    };
    let from = Rebuild {
        workers: [("a", false), ("b", false), ("c", true)]
            .into_iter()
            .map(|(k, flagged)| {
                let w = WorkerState {
                    flagged,
                    ..Default::default()
                };
                (k.to_string(), w)
            })
            .collect(),
        blocks: vec![(1, "w1".into(), 0)],
        leases: vec![
            lease_at(3, 0, lease_state::ACTIVE, "a"), // an old round's: dropped
            lease_at(4, 1, lease_state::ACTIVE, "a"),
            lease_at(5, 1, lease_state::DELIVERED, "b"),
        ],
        decided: vec![5],
        pending: vec![(
            0,
            Pending {
                update: 9,
                lease: Some(5),
                hash: "h".into(),
                steps: 8,
                received_ms: 100,
                base: 1,
            },
        )],
        invites: HashMap::new(),
        last_lease: 5,
        ..Default::default()
    };
    let mut core = Core::new(rules(1, 2), secrets(1), from, 50_000);
    assert_eq!(core.lease(3), None);
    assert_eq!(
        core.lease(4).unwrap().expires_ms,
        60_000,
        "a fresh life from now"
    );
    assert!(core.is_decided(5));
    assert_eq!(core.pending(0).len(), 1);
    assert_eq!(
        core.work("a", &WorkerInfo::new("cpu"), 50_001, true)
            .unwrap(),
        Work::Lease(core.lease(4).unwrap().clone(), false)
    );
    // Both slots are taken (a active, b delivered): a third worker waits.
    join(&mut core, "d");
    assert_eq!(
        core.work("d", &WorkerInfo::new("cpu"), 50_001, true)
            .unwrap(),
        Work::Wait
    );
    assert!(core.may_upload("c").is_err(), "flags survive");
    core.accept(
        0,
        Pending {
            update: 10,
            lease: Some(4),
            hash: "h2".into(),
            steps: 8,
            received_ms: 50_002,
            base: 1,
        },
        50_002,
    );
    core.committed(0, 2, "w2", 50_003);
    assert_eq!(
        lease(&mut core, "d", 50_004).id,
        6,
        "ids go on from the journal's"
    );
}

#[test]
fn soft_state_is_handed_to_the_journal_once() {
    let mut core = fresh(rules(1, 1));
    join(&mut core, "a");
    let l = lease(&mut core, "a", 0);
    core.take_soft();
    assert_eq!(core.take_soft(), Soft::default());
    core.heartbeat("a", l.id, 4_000).unwrap();
    let soft = core.take_soft();
    assert_eq!(soft.leases, vec![(l.id, "active".to_string(), 14_000)]);
    assert_eq!(soft.workers, vec![("a".to_string(), 4_000, None)]);
    assert_eq!(core.take_soft(), Soft::default());
    core.lapse(14_000);
    assert_eq!(
        core.take_soft().leases,
        vec![(l.id, "expired".to_string(), 14_000)]
    );
    // A hard transition is journaled by the shell at once, not again as soft state.
    core.heartbeat("a", l.id, 14_001).unwrap();
    core.refuse(l.id, false);
    assert!(core.take_soft().leases.is_empty());
}

#[test]
fn a_block_nobody_advances_is_stalled_until_it_moves() {
    let mut core = fresh(rules(2, 1));
    join(&mut core, "a");
    assert!(core.watch_stalls(90_000).is_empty());
    let changes = core.watch_stalls(90_001);
    assert_eq!(changes.len(), 2);
    assert!(changes.iter().all(|c| c.stalled && c.idle_ms == 90_001));
    assert!(core.stalled(0) && core.stalled(1));
    let l = lease(&mut core, "a", 90_002);
    core.accept(l.block, pending(1, &l, 90_003), 90_003);
    let changes = core.watch_stalls(90_004);
    assert_eq!(changes.len(), 1);
    assert!(!changes[0].stalled && !core.stalled(l.block));
    // A finished block is never stalled, however long nothing happens to it.
    let mut r = rules(2, 1);
    r.rounds = 1;
    let mut core = fresh(r);
    join(&mut core, "a");
    let l = lease(&mut core, "a", 0);
    core.accept(l.block, pending(1, &l, 1), 1);
    core.committed(l.block, 1, "w1", 2);
    core.watch_stalls(1_000_000);
    assert!(!core.stalled(l.block) && core.stalled(1 - l.block));
}

#[test]
fn a_closing_round_takes_no_more_uploads_until_it_commits_or_reopens() {
    let mut r = rules(1, 3);
    r.quorum = 1;
    let mut core = fresh(r);
    join(&mut core, "a");
    join(&mut core, "b");
    let (a, b) = (lease(&mut core, "a", 0), lease(&mut core, "b", 0));
    assert!(!core.begin_close(0, 0), "nothing to merge yet");
    core.accept(0, pending(1, &a, 1), 1);
    assert!(core.begin_close(0, 2));
    assert!(!core.begin_close(0, 2), "one merge at a time");
    assert!(core.ready_rounds(2).is_empty());
    assert!(matches!(core.lease_open(&b), Err(NodeError::Busy(m)) if m.contains("merged")));
    // A failed merge reopens the round as it was.
    core.abort_close(0);
    assert!(core.lease_open(&b).is_ok());
    assert_eq!(core.ready_rounds(3), vec![0]);
    assert!(core.begin_close(0, 3));
    core.committed(0, 1, "w1", 4);
    assert!(!core.begin_close(0, 5));
    let next = lease(&mut core, "a", 5);
    assert!(core.lease_open(&next).is_ok(), "the next round is open");
}

#[test]
fn a_closing_round_hands_out_no_lease() {
    let mut r = rules(1, 3);
    r.quorum = 1;
    let mut core = fresh(r);
    join(&mut core, "a");
    join(&mut core, "b");
    let a = lease(&mut core, "a", 0);
    core.accept(0, pending(1, &a, 1), 1);
    assert!(core.begin_close(0, 2));
    assert_eq!(
        core.work("b", &WorkerInfo::new("cpu"), 3, true).unwrap(),
        Work::Wait,
        "a lease of a version about to be left would be wasted work"
    );
    core.abort_close(0);
    assert!(matches!(
        core.work("b", &WorkerInfo::new("cpu"), 4, true).unwrap(),
        Work::Lease(_, true)
    ));
}

#[test]
fn a_decided_lease_left_open_in_the_journal_is_closed_at_rebuild() {
    let from = Rebuild {
        workers: [("a".to_string(), WorkerState::default())].into(),
        blocks: vec![(0, "w".into(), 0)],
        leases: vec![LeaseRow {
            id: 1,
            worker: "a".into(),
            block: 0,
            version: 0,
            slot: 0,
            steps: 8,
            seed: 1,
            issued_ms: 0,
            expires_ms: 5_000,
            state: lease_state::ACTIVE.into(),
            public: false,
        }],
        decided: vec![1],
        last_lease: 1,
        ..Default::default()
    };
    let mut core = Core::new(rules(1, 1), secrets(1), from, 0);
    assert_eq!(core.lease(1).unwrap().state, lease_state::REFUSED);
    assert_eq!(
        core.take_soft().leases,
        vec![(1, "refused".to_string(), 5_000)]
    );
    assert!(matches!(
        core.work("a", &WorkerInfo::new("cpu"), 1, true).unwrap(),
        Work::Lease(l, true) if l.id == 2
    ));
}
