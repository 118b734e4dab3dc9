//! The receipt ledger end to end on a SQLite file: building it, checking it offline,
//! and catching each way a coordinator (or anyone with the file) could rewrite it.
use std::path::Path;

use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::receipt::{
    verify_consistency, verify_inclusion, Claim, Decision, Receipt, ReceiptProof, TreeHead,
    RECEIPT_VERSION,
};
use blocktrain_train::ledger::{open_read_only, totals, verify_all, Ledger};
use rusqlite::Connection;

struct Keys {
    coord: Identity,
    w1: Identity,
    w2: Identity,
}

fn keys() -> Keys {
    let id = |b: u8| Identity::from_secret(&[b; 32]).unwrap();
    Keys {
        coord: id(1),
        w1: id(2),
        w2: id(3),
    }
}

fn claim(worker: &Identity, lease: i64, steps: i64) -> Claim {
    Claim {
        version: RECEIPT_VERSION,
        worker: worker.public_hex(),
        lease,
        block: (lease % 3) as u32,
        base_version: 1,
        update_blake3: blake3::hash(&lease.to_le_bytes()).to_hex().to_string(),
        steps,
        data_bytes: 1000 * steps as u64,
        local_loss: Some(2.0),
    }
}

fn decision(accepted: bool, reason: Option<&str>, time_ms: u64) -> Decision {
    Decision {
        accepted,
        reason: reason.map(str::to_string),
        resulting_version: accepted.then_some(2),
        heldout_before: Some(3.0),
        heldout_after: accepted.then_some(2.75),
        time_ms,
        staleness: 0,
    }
}

fn signed(worker: &Identity, lease: i64, steps: i64, accepted: bool, k: &Keys) -> Receipt {
    let c = claim(worker, lease, steps);
    let sig = c.sign(worker);
    let reason = (!accepted).then_some("update norm over the limit");
    Receipt::issue(
        c,
        Some(sig),
        decision(accepted, reason, lease as u64),
        &k.coord,
    )
}

/// The receipts of the test log, in order: both workers, accepted and rejected, and one
/// rejection that carried no valid claim.
fn receipts(k: &Keys) -> Vec<Receipt> {
    let unsigned = Receipt::issue(
        claim(&k.w1, 2, 0),
        None,
        decision(false, Some("bad claim signature"), 2),
        &k.coord,
    );
    vec![
        signed(&k.w1, 0, 100, true, k),
        signed(&k.w2, 1, 50, false, k),
        unsigned,
        signed(&k.w2, 3, 100, true, k),
        signed(&k.w1, 4, 200, true, k),
        signed(&k.w2, 5, 100, true, k),
    ]
}

/// Heads are signed after entries 1, 3, 4, 5 and 6: entries 1 and 2 share one.
const HEADS_AFTER: [u64; 5] = [1, 3, 4, 5, 6];

fn build(dir: &Path) -> (Connection, Ledger, Keys) {
    let k = keys();
    let conn = Connection::open(dir.join("state.sqlite")).unwrap();
    let mut ledger = Ledger::open(&conn, k.coord.clone()).unwrap();
    for (i, r) in receipts(&k).iter().enumerate() {
        assert_eq!(ledger.append(&conn, r).unwrap(), i as u64);
        if HEADS_AFTER.contains(&ledger.len()) {
            ledger.sign_head(&conn, 1000 + i as u64).unwrap();
        }
    }
    (conn, ledger, k)
}

/// Builds the log, applies `sql`, and returns verify_all's error.
fn tampered(sql: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (conn, _, _) = build(dir.path());
    conn.execute_batch(sql).unwrap();
    verify_all(&conn).unwrap_err().to_string()
}

#[test]
fn an_honest_ledger_verifies_and_sums_up() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, ledger, k) = build(dir.path());
    let report = verify_all(&conn).unwrap();
    assert_eq!((report.receipts, report.heads), (6, 5));
    assert_eq!(report.coordinator, Some(k.coord.public_hex()));

    let mine: Vec<u64> = Ledger::receipts_of(&conn, &k.w1.public_hex())
        .unwrap()
        .into_iter()
        .map(|(i, _)| i)
        .collect();
    assert_eq!(mine, vec![0, 2, 4]);
    assert_eq!(
        Ledger::receipt(&conn, 3).unwrap(),
        Some(receipts(&k)[3].clone())
    );
    assert_eq!(Ledger::receipt(&conn, 6).unwrap(), None);

    let t = totals(&conn).unwrap();
    let w1 = t.iter().find(|t| t.worker == k.w1.public_hex()).unwrap();
    assert_eq!((w1.accepted, w1.rejected, w1.accepted_steps), (2, 1, 300));
    assert!((w1.heldout_gain - 0.5).abs() < 1e-12);
    let w2 = t.iter().find(|t| t.worker == k.w2.public_hex()).unwrap();
    assert_eq!((w2.accepted, w2.rejected, w2.accepted_steps), (2, 1, 200));

    // Signing again without growth hands back the same head; reopening rebuilds the tree.
    let head = Ledger::latest_head(&conn).unwrap().unwrap();
    assert_eq!(ledger.sign_head(&conn, 9_999).unwrap(), head);
    let reopened = Ledger::open(&conn, k.coord.clone()).unwrap();
    assert_eq!(reopened.len(), 6);
    assert_eq!(hex::encode(reopened.log().root()), head.root);
}

#[test]
fn totals_pay_nothing_on_the_data_bytes_workers_declare() {
    // Two workers with the same accepted work; one declares a billion times the data in
    // its claims. Nothing checks that figure, so the payout totals must not differ.
    let dir = tempfile::tempdir().unwrap();
    let k = keys();
    let conn = Connection::open(dir.path().join("state.sqlite")).unwrap();
    let mut ledger = Ledger::open(&conn, k.coord.clone()).unwrap();
    for (worker, declared) in [(&k.w1, 1), (&k.w2, 1_000_000_000)] {
        let mut c = claim(worker, 7, 100);
        c.data_bytes = declared;
        let sig = c.sign(worker);
        let r = Receipt::issue(c, Some(sig), decision(true, None, 7), &k.coord);
        ledger.append(&conn, &r).unwrap();
    }
    let t = totals(&conn).unwrap();
    let json = serde_json::to_value(&t).unwrap();
    let (a, b) = (&json[0], &json[1]);
    let figures = |v: &serde_json::Value| {
        let mut m = v.as_object().unwrap().clone();
        m.remove("worker");
        m
    };
    assert_eq!(figures(a), figures(b), "{json}");
    assert!(!json.to_string().contains("data_bytes"), "{json}");
}

#[test]
fn appends_only_what_this_coordinator_signed() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, mut ledger, k) = build(dir.path());
    let other = Receipt::issue(claim(&k.w1, 9, 1), None, decision(false, None, 9), &k.w2);
    assert!(ledger.append(&conn, &other).is_err());
    let mut forged = receipts(&k)[0].clone();
    forged.claim.steps = 10_000;
    assert!(ledger.append(&conn, &forged).is_err());
    assert_eq!(ledger.len(), 6);
    // A row that appeared behind the ledger's back stops it rather than overwriting.
    conn.execute(
        "INSERT INTO ledger (idx, receipt) VALUES (6, (SELECT receipt FROM ledger WHERE idx = 0))",
        [],
    )
    .unwrap();
    let err = ledger.append(&conn, &receipts(&k)[0]).unwrap_err();
    assert!(err.to_string().contains("out of step"), "{err}");
}

#[test]
fn a_changed_stored_field_names_its_entry() {
    let steps = tampered(
        "UPDATE ledger SET receipt = replace(receipt, '\"steps\":100', '\"steps\":1000') WHERE idx = 3",
    );
    assert!(steps.contains("ledger entry 3:"), "{steps}");
    assert!(steps.contains("signature"), "{steps}");
    let accepted = tampered(
        "UPDATE ledger SET receipt = replace(receipt, '\"accepted\":false', '\"accepted\":true') WHERE idx = 1",
    );
    assert!(
        accepted.contains("ledger entry 1: coordinator signature"),
        "{accepted}"
    );
    let reason = tampered(
        "UPDATE ledger SET receipt = replace(receipt, 'bad claim signature', 'timeout') WHERE idx = 2",
    );
    assert!(
        reason.contains("ledger entry 2: coordinator signature"),
        "{reason}"
    );
    let garbage = tampered("UPDATE ledger SET receipt = '{' WHERE idx = 4");
    assert!(
        garbage.contains("ledger entry 4: does not parse"),
        "{garbage}"
    );
}

#[test]
fn a_deleted_entry_is_named() {
    let middle = tampered("DELETE FROM ledger WHERE idx = 2");
    assert!(middle.contains("ledger entry 2: missing"), "{middle}");
    let last = tampered("DELETE FROM ledger WHERE idx = 5");
    assert!(last.contains("ledger entry 5: missing"), "{last}");
}

#[test]
fn swapped_entries_are_named_by_the_heads() {
    let swap = tampered(
        "UPDATE ledger SET idx = -1 WHERE idx = 1;
         UPDATE ledger SET idx = 1 WHERE idx = 2;
         UPDATE ledger SET idx = 2 WHERE idx = -1;",
    );
    assert!(swap.contains("ledger entries 1..=2"), "{swap}");
    // With a head after every entry the first moved entry is named alone.
    let swap = tampered(
        "UPDATE ledger SET idx = -1 WHERE idx = 3;
         UPDATE ledger SET idx = 3 WHERE idx = 4;
         UPDATE ledger SET idx = 4 WHERE idx = -1;",
    );
    assert!(swap.contains("ledger entries 3..=3"), "{swap}");
}

#[test]
fn a_forged_tree_head_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, _, k) = build(dir.path());
    let honest = Ledger::head(&conn, 4).unwrap().unwrap();
    let store = |h: &TreeHead| {
        conn.execute(
            "UPDATE tree_heads SET head = ?1 WHERE size = 4",
            [serde_json::to_string(h).unwrap()],
        )
        .unwrap();
    };

    let mut moved_root = honest.clone();
    moved_root.root = Ledger::head(&conn, 3).unwrap().unwrap().root;
    store(&moved_root);
    let err = verify_all(&conn).unwrap_err().to_string();
    assert!(
        err.contains("tree head of size 4: tree head signature"),
        "{err}"
    );

    // Correct root, but signed by someone else's key.
    let root = hex::decode(&honest.root).unwrap();
    store(&TreeHead::sign(4, &root, honest.time_ms, &k.w1));
    let err = verify_all(&conn).unwrap_err().to_string();
    assert!(
        err.contains("tree head of size 4: signed by coordinator"),
        "{err}"
    );

    // The coordinator's own key over a root the receipts do not give.
    store(&TreeHead::sign(4, &[0; 32], honest.time_ms, &k.coord));
    let err = verify_all(&conn).unwrap_err().to_string();
    assert!(err.contains("ledger entries 3..=3"), "{err}");

    store(&honest);
    verify_all(&conn).unwrap();
}

#[test]
fn proofs_verify_against_heads_a_worker_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, ledger, k) = build(dir.path());
    let latest = Ledger::latest_head(&conn).unwrap().unwrap();
    for (i, r) in receipts(&k).iter().enumerate() {
        let proof = ledger.prove_inclusion(i as u64, latest.size).unwrap();
        verify_inclusion(&latest, r, &proof).unwrap();
        let mut changed = r.clone();
        changed.decision.accepted = !changed.decision.accepted;
        assert!(verify_inclusion(&latest, &changed, &proof).is_err());
        let full = ReceiptProof {
            receipt: r.clone(),
            head: latest.clone(),
            proof,
        };
        full.verify(Some(&k.coord.public_hex())).unwrap();
    }
    // Against an older head too (the tree is rebuilt to that size).
    let old = Ledger::head(&conn, 3).unwrap().unwrap();
    let proof = ledger.prove_inclusion(1, 3).unwrap();
    verify_inclusion(&old, &receipts(&k)[1], &proof).unwrap();
    assert!(ledger.prove_inclusion(3, 3).is_err());
    assert!(ledger.prove_inclusion(0, 7).is_err());

    for a in HEADS_AFTER {
        for b in HEADS_AFTER.into_iter().filter(|&b| b >= a) {
            let (ha, hb) = (
                Ledger::head(&conn, a).unwrap().unwrap(),
                Ledger::head(&conn, b).unwrap().unwrap(),
            );
            verify_consistency(&ha, &hb, &ledger.prove_consistency(a, b).unwrap()).unwrap();
        }
    }
}

#[test]
fn a_rewritten_history_fails_consistency_with_a_kept_head() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, _, k) = build(dir.path());
    let kept = Ledger::head(&conn, 3).unwrap().unwrap();

    // The coordinator replaces entry 1 with a different, validly signed receipt, reopens,
    // grows the log and signs a head over the rewritten history.
    let replacement = signed(&k.w2, 1, 50, true, &k);
    conn.execute(
        "UPDATE ledger SET receipt = ?1 WHERE idx = 1",
        [serde_json::to_string(&replacement).unwrap()],
    )
    .unwrap();
    let mut ledger = Ledger::open(&conn, k.coord.clone()).unwrap();
    ledger
        .append(&conn, &signed(&k.w1, 6, 10, true, &k))
        .unwrap();
    let new = ledger.sign_head(&conn, 5_000).unwrap();
    new.verify().unwrap();

    let proof = ledger.prove_consistency(3, new.size).unwrap();
    let err = verify_consistency(&kept, &new, &proof).unwrap_err();
    assert!(err.to_string().contains("not an extension"), "{err}");
    // The replaced receipt is provably in the new log, but not in the kept one's.
    let p = ledger.prove_inclusion(1, new.size).unwrap();
    verify_inclusion(&new, &replacement, &p).unwrap();
    assert!(verify_inclusion(&kept, &replacement, &ledger.prove_inclusion(1, 3).unwrap()).is_err());
    // And the stored old heads give the rewrite away offline.
    let err = verify_all(&conn).unwrap_err().to_string();
    assert!(err.contains("ledger entries 1..=2"), "{err}");
}

#[test]
fn opening_refuses_an_unparsable_entry_and_read_only_tools_explain_absences() {
    let dir = tempfile::tempdir().unwrap();
    let (conn, _, k) = build(dir.path());
    let ro = open_read_only(dir.path()).unwrap();
    assert_eq!(verify_all(&ro).unwrap().receipts, 6);
    conn.execute("UPDATE ledger SET receipt = 'x' WHERE idx = 3", [])
        .unwrap();
    let err = Ledger::open(&conn, k.coord.clone()).unwrap_err();
    assert!(err.to_string().contains("ledger entry 3"), "{err}");

    let missing = open_read_only(&dir.path().join("nope")).unwrap_err();
    assert!(
        missing.to_string().contains("no such state directory"),
        "{missing}"
    );
    let empty = tempfile::tempdir().unwrap();
    let no_db = open_read_only(empty.path()).unwrap_err();
    assert!(
        no_db.to_string().contains("no coordinator database"),
        "{no_db}"
    );
    Connection::open(empty.path().join("state.sqlite"))
        .unwrap()
        .execute_batch("CREATE TABLE meta (key TEXT)")
        .unwrap();
    let no_ledger = open_read_only(empty.path()).unwrap_err();
    assert!(
        no_ledger.to_string().contains("no receipt ledger"),
        "{no_ledger}"
    );
}
