//! The core's rules, checked on plain memory: no temporary directory, no database, no
//! libtorch. Each test drives transitions with an explicit clock.
use blocktrain_protocol::wire::{join_proof, DataShard, RegisterRequest, WorkerInfo};

use super::*;
use crate::NodeError;

mod round;
mod stale;

pub(super) fn rules(blocks: usize, per_block: u32) -> Rules {
    Rules {
        blocks,
        rounds: 3,
        workers_per_block: per_block,
        quorum: per_block,
        lease_ms: 10_000,
        max_lease_ms: 100_000,
        round_timeout_ms: 30_000,
        max_staleness: 0,
        stall_ms: 90_000,
        local_steps: 8,
        round_seconds: 0.0,
        schedule_total: 24,
        batch: 4,
        codec: "fp16".into(),
        carry_moments: false,
        spot_check_fraction: 0.0,
        run_seed: 7,
        train_memory: vec![1000; blocks],
        admission: Admission::default(),
    }
}

pub(super) fn secrets(k: u8) -> Secrets {
    Secrets {
        reseed: [k; 32],
        check_lease: [k + 1; 32],
    }
}

pub(super) fn fresh(r: Rules) -> Core {
    let blocks = (0..r.blocks).map(|b| (0, format!("wire{b}"), 0)).collect();
    let from = Rebuild {
        blocks,
        ..Default::default()
    };
    Core::new(r, secrets(1), from, 0)
}

pub(super) fn join(core: &mut Core, key: &str) {
    let req = RegisterRequest {
        info: WorkerInfo::new("cpu"),
        join_proof: None,
    };
    let reg = core.admit(key, &req).unwrap();
    core.registered(key, &req.info, &reg, 0);
}

pub(super) fn lease(core: &mut Core, key: &str, now: u64) -> LeaseRow {
    match core.work(key, &WorkerInfo::new("cpu"), now, true).unwrap() {
        Work::Lease(l, _) => l,
        other => panic!("{key}: expected a lease, got {other:?}"),
    }
}

pub(super) fn pending(update: i64, lease: &LeaseRow, now: u64) -> Pending {
    Pending {
        update,
        lease: Some(lease.id),
        hash: format!("h{update}"),
        steps: lease.steps,
        received_ms: now,
        base: lease.version,
    }
}

#[test]
fn workers_spread_over_blocks_until_every_slot_is_taken() {
    let mut core = fresh(rules(2, 2));
    for k in ["a", "b", "c", "d", "e"] {
        join(&mut core, k);
    }
    let got: Vec<(usize, u32)> = ["a", "b", "c", "d"]
        .iter()
        .map(|k| {
            let l = lease(&mut core, k, 0);
            (l.block, l.slot)
        })
        .collect();
    // Fewest workers first, then the lower block: 0, 1, 0, 1; slots in order.
    assert_eq!(got, vec![(0, 0), (1, 0), (0, 1), (1, 1)]);
    assert_eq!(
        core.work("e", &WorkerInfo::new("cpu"), 0, true).unwrap(),
        Work::Wait
    );
    assert_eq!(core.active_leases(0), 2);
}

#[test]
fn a_worker_prefers_the_block_it_trained_last() {
    let mut core = fresh(rules(2, 2));
    join(&mut core, "x");
    join(&mut core, "y");
    let (x, y) = (lease(&mut core, "x", 0), lease(&mut core, "y", 0));
    assert_eq!((x.block, y.block), (0, 1));
    core.refuse(x.id, false);
    core.refuse(y.id, false);
    // Both blocks are empty again: each worker goes back to its own (its checkpoint is
    // cached), not to the lower block.
    assert_eq!(lease(&mut core, "y", 1).block, 1);
    assert_eq!(lease(&mut core, "x", 1).block, 0);
}

#[test]
fn a_retried_request_gets_the_lease_it_holds_and_the_fast_path_issues_nothing() {
    let mut core = fresh(rules(1, 2));
    join(&mut core, "a");
    join(&mut core, "b");
    assert_eq!(
        core.work("a", &WorkerInfo::new("cpu"), 0, false).unwrap(),
        Work::WouldIssue
    );
    let l = lease(&mut core, "a", 0);
    assert_eq!(l.id, 1, "the fast path's answer took no id");
    assert_eq!(
        core.work("a", &WorkerInfo::new("cpu"), 5, false).unwrap(),
        Work::Lease(l.clone(), false)
    );
    assert_eq!(lease(&mut core, "b", 0).id, 2);
}

#[test]
fn unknown_flagged_and_too_small_workers_are_refused() {
    let mut r = rules(2, 2);
    r.train_memory = vec![5000, 2000];
    let mut core = fresh(r);
    let info = WorkerInfo::new("cpu");
    assert!(matches!(
        core.work("nobody", &info, 0, true),
        Err(NodeError::Unauthenticated(_))
    ));
    join(&mut core, "small");
    let mut small = info.clone();
    small.memory_bytes = 1000;
    assert!(
        matches!(core.work("small", &small, 0, true), Err(NodeError::Rejected(m)) if m.contains("free memory"))
    );
    // A block that does not fit is skipped, though it has fewer workers.
    small.memory_bytes = 3000;
    match core.work("small", &small, 0, true).unwrap() {
        Work::Lease(l, true) => assert_eq!(l.block, 1),
        other => panic!("{other:?}"),
    }
    join(&mut core, "cheat");
    core.flag("cheat");
    assert!(matches!(
        core.work("cheat", &info, 0, true),
        Err(NodeError::Forbidden(_))
    ));
    assert!(matches!(
        core.may_upload("cheat"),
        Err(NodeError::Forbidden(_))
    ));
}

#[test]
fn a_lapsed_lease_frees_its_slot_for_the_next_worker_with_the_same_seed() {
    let mut core = fresh(rules(1, 1));
    join(&mut core, "a");
    join(&mut core, "b");
    let a = lease(&mut core, "a", 0);
    assert_eq!(seed_of(7, 0, 0, 0), a.seed);
    assert_eq!(
        core.work("b", &WorkerInfo::new("cpu"), 9_999, true)
            .unwrap(),
        Work::Wait
    );
    assert_eq!(core.lapse(9_999), 0);
    let b = lease(&mut core, "b", 10_000);
    assert_eq!(core.lease(a.id).unwrap().state, lease_state::EXPIRED);
    assert_eq!((b.slot, b.seed), (a.slot, a.seed));
    // a's heartbeat cannot take the slot back.
    assert_eq!(
        core.heartbeat("a", a.id, 10_001).unwrap(),
        Beat::Wanted(false)
    );
}

#[test]
fn heartbeats_renew_until_the_longest_life_and_revive_only_a_free_slot() {
    let mut core = fresh(rules(1, 2));
    join(&mut core, "a");
    join(&mut core, "b");
    let a = lease(&mut core, "a", 0);
    for t in (5_000..100_000).step_by(5_000) {
        assert_eq!(core.heartbeat("a", a.id, t).unwrap(), Beat::Wanted(true));
        assert_eq!(core.lapse(t), 0);
    }
    assert_eq!(
        core.lapse(100_000),
        1,
        "max_lease_ms ends it, renewed or not"
    );
    assert_eq!(
        core.heartbeat("a", a.id, 100_001).unwrap(),
        Beat::Wanted(false)
    );
    // A lease that lapsed for want of heartbeats comes back while its slot is free...
    let b = lease(&mut core, "b", 100_000);
    core.lapse(110_000);
    assert_eq!(core.lease(b.id).unwrap().state, lease_state::EXPIRED);
    assert_eq!(
        core.heartbeat("b", b.id, 110_001).unwrap(),
        Beat::Wanted(true)
    );
    assert_eq!(core.lease(b.id).unwrap().state, lease_state::ACTIVE);
    // ...but not once another worker holds its slot, though the round has room.
    assert_eq!(core.lapse(120_001), 1);
    join(&mut core, "c");
    let c = lease(&mut core, "c", 120_001);
    assert_eq!(c.slot, b.slot);
    assert_eq!(
        core.heartbeat("b", b.id, 120_002).unwrap(),
        Beat::Wanted(false)
    );
    // Another's lease or an unknown one is not the signer's to renew.
    assert!(matches!(
        core.heartbeat("a", b.id, 120_002),
        Err(NodeError::Forbidden(_))
    ));
    assert_eq!(core.heartbeat("a", 999, 120_002).unwrap(), Beat::NotCurrent);
}

#[test]
fn registration_follows_the_allowlist_the_join_secret_and_invites() {
    let mut r = rules(1, 1);
    r.admission = Admission {
        allow: vec![],
        join_secret: Some("s3cret".into()),
        invites: vec!["tok".into()],
    };
    let mut core = fresh(r.clone());
    let req = |key: &str, secret: Option<&str>| RegisterRequest {
        info: WorkerInfo::new("cpu"),
        join_proof: secret.map(|s| join_proof(s, key)),
    };
    assert!(matches!(
        core.admit("a", &req("a", None)),
        Err(NodeError::Forbidden(_))
    ));
    assert!(matches!(
        core.admit("a", &req("a", Some("wrong"))),
        Err(NodeError::Forbidden(_))
    ));
    assert_eq!(
        core.admit("a", &req("a", Some("s3cret"))).unwrap().invite,
        None
    );
    // An invite belongs to the first key that registers with it.
    let reg = core.admit("b", &req("b", Some("tok"))).unwrap();
    assert!(reg.invite.is_some());
    assert!(core.worker("b").is_none(), "admit alone changes nothing");
    core.registered("b", &WorkerInfo::new("cpu"), &reg, 0);
    assert!(core.admit("b", &req("b", Some("tok"))).is_ok());
    assert!(
        matches!(core.admit("c", &req("c", Some("tok"))), Err(NodeError::Forbidden(m)) if m.contains("belongs to"))
    );
    r.admission = Admission {
        allow: vec!["a".into()],
        ..Default::default()
    };
    let core = fresh(r);
    assert!(core.admit("a", &req("a", None)).is_ok());
    assert!(matches!(
        core.admit("z", &req("z", None)),
        Err(NodeError::Forbidden(_))
    ));
    // Own data is fixed at first registration: dropping it would skip check leases.
    let mut core = fresh(rules(1, 1));
    join(&mut core, "plain");
    let mut with_data = req("plain", None);
    with_data.info.data = Some(DataShard {
        blake3: "d".repeat(64),
        bytes: 1,
    });
    assert!(
        matches!(core.admit("plain", &with_data), Err(NodeError::Rejected(m)) if m.contains("cannot change"))
    );
    let mut old = req("a", None);
    old.info.wire_version += 1;
    assert!(matches!(core.admit("a", &old), Err(NodeError::Rejected(_))));
}

#[test]
fn servers_announce_as_registered_workers_or_by_the_run_admission() {
    let mut r = rules(1, 1);
    r.admission = Admission {
        allow: vec![],
        join_secret: Some("s3cret".into()),
        invites: vec![],
    };
    let mut core = fresh(r.clone());
    let forbidden = |x: crate::Result<()>| matches!(x, Err(NodeError::Forbidden(_)));
    assert!(forbidden(core.may_announce("s", None)));
    assert!(forbidden(
        core.may_announce("s", Some(&join_proof("wrong", "s")))
    ));
    // A proof is bound to its key.
    assert!(forbidden(
        core.may_announce("s", Some(&join_proof("s3cret", "t")))
    ));
    assert!(core
        .may_announce("s", Some(&join_proof("s3cret", "s")))
        .is_ok());
    // A registered worker's key needs no proof, until it is flagged.
    let req = RegisterRequest {
        info: WorkerInfo::new("cpu"),
        join_proof: Some(join_proof("s3cret", "w")),
    };
    let reg = core.admit("w", &req).unwrap();
    core.registered("w", &req.info, &reg, 0);
    assert!(core.may_announce("w", None).is_ok());
    core.flag("w");
    assert!(forbidden(core.may_announce("w", None)));
    // An allowlist binds servers too; an invite-only run wants a registered key.
    r.admission = Admission {
        allow: vec!["a".into()],
        ..Default::default()
    };
    let core = fresh(r.clone());
    assert!(core.may_announce("a", None).is_ok());
    assert!(forbidden(core.may_announce("z", None)));
    r.admission = Admission {
        invites: vec!["tok".into()],
        ..Default::default()
    };
    let core = fresh(r);
    assert!(forbidden(
        core.may_announce("a", Some(&join_proof("tok", "a")))
    ));
    // An open run lets any key announce.
    assert!(fresh(rules(1, 1)).may_announce("any", None).is_ok());
}

#[test]
fn own_data_buys_no_exemption_from_check_leases() {
    let mut r = rules(1, 1);
    r.spot_check_fraction = 1.0;
    let mut core = fresh(r.clone());
    let mut info = WorkerInfo::new("cpu");
    info.data = Some(DataShard {
        blake3: "d".repeat(64),
        bytes: 10,
    });
    let req = RegisterRequest {
        info: info.clone(),
        join_proof: None,
    };
    let reg = core.admit("own", &req).unwrap();
    core.registered("own", &info, &reg, 0);
    join(&mut core, "plain");
    assert!(lease(&mut core, "own", 0).public);
    r.spot_check_fraction = 0.0;
    let mut core = fresh(r);
    core.registered("own", &info, &reg, 0);
    assert!(!lease(&mut core, "own", 0).public);
}

#[test]
fn local_steps_follow_the_measured_rate_within_a_quarter_and_four_times_h() {
    let mut r = rules(3, 1);
    r.round_seconds = 10.0;
    let mut core = fresh(r);
    for (key, rate, want) in [("slow", 0.1, 2), ("fit", 1.5, 15), ("fast", 100.0, 32)] {
        join(&mut core, key);
        let mut info = WorkerInfo::new("cpu");
        info.step_rate = Some(rate);
        match core.work(key, &info, 0, true).unwrap() {
            Work::Lease(l, true) => assert_eq!(l.steps, want, "{key}"),
            other => panic!("{other:?}"),
        }
    }
}
