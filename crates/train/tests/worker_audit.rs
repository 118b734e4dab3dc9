//! The worker's checks of what a coordinator tells it, against a fake coordinator that
//! can lie: checkpoint names that are not hashes, a changed key, receipts left out.
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::receipt::{Claim, Decision, Receipt, ReceiptProof, RECEIPT_VERSION};
use blocktrain_train::client::Client;
use blocktrain_train::ledger::Ledger;
use blocktrain_train::worker::{audit_receipts, Record, Seen, Upload};
use rusqlite::Connection;

mod support;
use support::{error, serve, Served};

/// A coordinator's ledger, served as `/v1/ledger/*` is, with receipts it can leave
/// out of a worker's listing, and the run's `max_staleness` in `/v1/run` (None: that
/// route answers as before stale updates, 404). Any other GET answers bytes that are
/// no checkpoint.
struct Fake {
    _dir: tempfile::TempDir,
    conn: Connection,
    ledger: Ledger,
    hidden: HashSet<u64>,
    max_staleness: Option<u64>,
}

impl Fake {
    fn new(coordinator: &Identity) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("state.sqlite")).unwrap();
        let ledger = Ledger::open(&conn, coordinator.clone()).unwrap();
        Fake {
            _dir: dir,
            conn,
            ledger,
            hidden: HashSet::new(),
            max_staleness: None,
        }
    }

    /// Appends `r` and signs the new head, as the coordinator does.
    fn append(&mut self, r: &Receipt) -> u64 {
        let i = self.ledger.append(&self.conn, r).unwrap();
        self.ledger.sign_head(&self.conn, 1000 + i).unwrap();
        i
    }
}

type Shared = Arc<Mutex<Fake>>;

#[derive(serde::Deserialize)]
struct Worker {
    worker: String,
}

#[derive(serde::Deserialize)]
struct Sizes {
    from: u64,
    to: u64,
}

fn fake(coordinator: &Identity) -> (Shared, Served) {
    let shared = Arc::new(Mutex::new(Fake::new(coordinator)));
    let app = Router::new()
        .route(
            "/v1/ledger/head",
            get(|State(s): State<Shared>| async move {
                let f = s.lock().unwrap();
                match Ledger::latest_head(&f.conn).unwrap() {
                    Some(h) => Json(h).into_response(),
                    None => error(StatusCode::NOT_FOUND, "not found: the ledger is empty"),
                }
            }),
        )
        .route(
            "/v1/ledger/receipts",
            get(
                |State(s): State<Shared>, Query(q): Query<Worker>| async move {
                    let f = s.lock().unwrap();
                    let rows: Vec<_> = Ledger::receipts_of(&f.conn, &q.worker)
                        .unwrap()
                        .into_iter()
                        .filter(|(i, _)| !f.hidden.contains(i))
                        .map(|(i, _)| serde_json::json!({ "index": i }))
                        .collect();
                    Json(serde_json::json!({ "receipts": rows }))
                },
            ),
        )
        .route(
            "/v1/ledger/receipts/{index}",
            get(|State(s): State<Shared>, Path(i): Path<u64>| async move {
                let f = s.lock().unwrap();
                let head = Ledger::latest_head(&f.conn).unwrap().unwrap();
                Json(ReceiptProof {
                    receipt: Ledger::receipt(&f.conn, i).unwrap().unwrap(),
                    proof: f.ledger.prove_inclusion(i, head.size).unwrap(),
                    head,
                })
            }),
        )
        .route(
            "/v1/ledger/consistency",
            get(
                |State(s): State<Shared>, Query(q): Query<Sizes>| async move {
                    let f = s.lock().unwrap();
                    Json(f.ledger.prove_consistency(q.from, q.to).unwrap())
                },
            ),
        )
        .route(
            "/v1/run",
            get(|State(s): State<Shared>| async move {
                match s.lock().unwrap().max_staleness {
                    Some(k) => Json(serde_json::json!({ "max_staleness": k })).into_response(),
                    None => error(StatusCode::NOT_FOUND, "not found"),
                }
            }),
        )
        .fallback(|| async { (StatusCode::OK, "not the checkpoint you asked for") })
        .with_state(shared.clone());
    (shared, serve(app))
}

fn hash(body: &str) -> String {
    blake3::hash(body.as_bytes()).to_hex().to_string()
}

/// The coordinator's receipt for `worker`'s upload of `body` on `lease` (block 1, v1).
fn receipt(worker: &Identity, coord: &Identity, lease: i64, body: &str, ok: bool) -> Receipt {
    let claim = Claim {
        version: RECEIPT_VERSION,
        worker: worker.public_hex(),
        lease,
        block: 0,
        base_version: 1,
        update_blake3: hash(body),
        steps: 4,
        data_bytes: 0,
        local_loss: None,
    };
    let sig = claim.sign(worker);
    let decision = Decision {
        accepted: ok,
        reason: (!ok).then(|| "held-out screening".into()),
        resulting_version: ok.then_some(2),
        heldout_before: None,
        heldout_after: None,
        time_ms: 5,
        staleness: 0,
    };
    Receipt::issue(claim, Some(sig), decision, coord)
}

/// What the worker journals for that upload: taken into the round (the reply said the
/// block is still at v1) or refused.
fn upload(lease: i64, body: &str, accepted: bool) -> Upload {
    Upload {
        lease,
        block: 0,
        base_version: 1,
        update_blake3: hash(body),
        update_id: accepted.then_some(lease * 10),
        accepted,
        block_version: accepted.then_some(1),
        reason: (!accepted).then(|| "rejected: held-out screening".into()),
        time_ms: 1,
    }
}

fn client(url: &str, id: &Identity) -> Client {
    let mut c = Client::new(url, id.clone()).unwrap();
    c.retry_for = Duration::from_secs(1);
    c
}

#[test]
fn checkpoint_names_that_are_not_blake3_hex_are_refused_before_any_use() {
    let (_, served) = fake(&Identity::generate());
    let mut c = client(&served.url, &Identity::generate());
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("a/cache");
    for bad in [
        "abc".to_string(),
        "../../escape".to_string(),
        format!("../{}", "a".repeat(61)),
        "AB".repeat(32),
        format!("{}g", "a".repeat(63)),
        "é".repeat(32), // 64 bytes, not 64 digits
        String::new(),
    ] {
        let e = c.checkpoint(&bad, &cache).unwrap_err().to_string();
        assert!(e.contains("not a blake3 hash"), "{bad:?}: {e}");
    }
    // Nothing was written, in the cache or beside it.
    let written: Vec<_> = walk(root.path());
    assert!(written.is_empty(), "{written:?}");
    // A well-formed hash is fetched and, not matching its bytes, refused as corrupt.
    let e = c.checkpoint(&"ab".repeat(32), &cache).unwrap_err();
    assert!(
        e.to_string().contains("could not be downloaded intact"),
        "{e}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        match p.is_dir() {
            true => out.extend(walk(&p)),
            false => out.push(p),
        }
    }
    out
}

#[test]
fn a_changed_coordinator_key_is_refused_not_taken_for_a_new_record() {
    let (w, k1, k2) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let (book, served) = fake(&k1);
    book.lock()
        .unwrap()
        .append(&receipt(&w, &k1, 1, "one", true));
    let root = tempfile::tempdir().unwrap();
    let record = Record::open(root.path(), &w.public_hex()).unwrap();
    let mut c = client(&served.url, &w);
    let first = audit_receipts(&mut c, &w.public_hex(), &record, &Seen::default()).unwrap();
    assert_eq!(
        (first.receipts, first.size, first.consistent_with),
        (1, 1, None)
    );
    assert_eq!(record.pinned().unwrap(), Some(k1.public_hex()));

    // The same address now answers with another key's ledger.
    *book.lock().unwrap() = Fake::new(&k2);
    book.lock()
        .unwrap()
        .append(&receipt(&w, &k2, 1, "one", true));
    let e = audit_receipts(&mut c, &w.public_hex(), &record, &Seen::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&k1.public_hex()) && e.contains(&k2.public_hex()) && e.contains("Refusing"),
        "{e}"
    );
    assert_eq!(record.pinned().unwrap(), Some(k1.public_hex()));
    assert_eq!(
        record.kept_head().unwrap().unwrap().coordinator,
        k1.public_hex()
    );
}

#[test]
fn uploads_without_a_receipt_are_missing_once_due_and_pending_until_then() {
    let (w, k) = (Identity::generate(), Identity::generate());
    let (book, served) = fake(&k);
    let mut c = client(&served.url, &w);
    let root = tempfile::tempdir().unwrap();
    let record = Record::open(root.path(), &w.public_hex()).unwrap();
    // A refusal with its receipt, and an update taken into a round that is still open.
    book.lock()
        .unwrap()
        .append(&receipt(&w, &k, 1, "refused", false));
    record.record(&upload(1, "refused", false)).unwrap();
    record.record(&upload(2, "pending", true)).unwrap();
    let me = w.public_hex();
    let a = audit_receipts(&mut c, &me, &record, &Seen::default()).unwrap();
    assert_eq!((a.receipts, a.uploads, a.pending), (1, 2, 1), "{a}");
    assert!(
        a.to_string().contains("wait for their round to close"),
        "{a}"
    );

    // Once the worker has seen the block move on, the round has closed: the receipt is due.
    let mut moved = Seen::default();
    moved.saw(0, 2);
    for seen in [
        moved,
        Seen {
            done: true,
            ..Seen::default()
        },
    ] {
        let e = audit_receipts(&mut c, &me, &record, &seen)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no receipt for 1 of my uploads") && e.contains("lease 2 "),
            "{e}"
        );
    }
    // Its receipt arrives: all accounted for, and the log extends the one kept.
    book.lock()
        .unwrap()
        .append(&receipt(&w, &k, 2, "pending", true));
    let a = audit_receipts(&mut c, &me, &record, &Seen::default()).unwrap();
    assert_eq!(
        (a.receipts, a.pending, a.consistent_with),
        (2, 0, Some(1)),
        "{a}"
    );
}

#[test]
fn a_refusal_the_coordinator_leaves_out_of_my_listing_is_reported() {
    let (w, other, k) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let (book, served) = fake(&k);
    {
        let mut b = book.lock().unwrap();
        b.append(&receipt(&w, &k, 1, "shown", false));
        let i = b.append(&receipt(&w, &k, 2, "left out", false));
        b.append(&receipt(&other, &k, 3, "someone else's", true));
        b.hidden.insert(i);
    }
    let root = tempfile::tempdir().unwrap();
    let record = Record::open(root.path(), &w.public_hex()).unwrap();
    record.record(&upload(1, "shown", false)).unwrap();
    record.record(&upload(2, "left out", false)).unwrap();
    let mut c = client(&served.url, &w);
    let e = audit_receipts(&mut c, &w.public_hex(), &record, &Seen::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("ledger audit failed"), "{e}");
    assert!(e.contains("lease 2 ") && !e.contains("lease 1 "), "{e}");
    assert!(e.contains("refused: rejected: held-out screening"), "{e}");
    // Another worker with the same directory keeps its own record and owes nothing.
    let theirs = Record::open(root.path(), &other.public_hex()).unwrap();
    let mut c = client(&served.url, &other);
    let a = audit_receipts(&mut c, &other.public_hex(), &theirs, &Seen::default()).unwrap();
    assert_eq!((a.receipts, a.uploads), (1, 0));
}

/// An accepted upload whose reply named a later version than its base: with the run's
/// max_staleness 0 that is a merge it completed (its receipt is due at once), with K > 0
/// it may be a stale update in that later round (due once the block passes it).
#[test]
fn a_stale_upload_is_pending_until_the_round_it_joined_closes() {
    let (w, k) = (Identity::generate(), Identity::generate());
    let me = w.public_hex();
    let mut u = upload(3, "stale", true);
    u.block_version = Some(2); // trained from v1, the reply said v2
    let at = |v: u64| {
        let mut s = Seen::default();
        s.saw(0, v);
        s
    };
    for (staleness, v, due) in [
        (None, 2, true),
        (Some(0), 2, true),
        (Some(1), 2, false),
        (Some(1), 3, true),
        (Some(5), 3, true),
    ] {
        // A record per run: each pins the max_staleness its coordinator announced.
        let root = tempfile::tempdir().unwrap();
        let record = Record::open(root.path(), &me).unwrap();
        record.record(&u).unwrap();
        let (book, served) = fake(&k);
        book.lock().unwrap().max_staleness = staleness;
        let mut c = client(&served.url, &w);
        match audit_receipts(&mut c, &me, &record, &at(v)) {
            Ok(a) => assert!(!due && a.pending == 1, "{staleness:?} at v{v}: {a}"),
            Err(e) => assert!(
                due && e.to_string().contains("no receipt for 1 of my uploads"),
                "{staleness:?} at v{v}: {e}"
            ),
        }
    }
}

/// A merged receipt of `worker`'s upload trained from v1, merged with staleness `s`
/// into version `into`.
fn merged(worker: &Identity, coord: &Identity, lease: i64, s: u64, into: u64) -> Receipt {
    let mut r = receipt(worker, coord, lease, &format!("stale {lease}"), true);
    r.decision.staleness = s;
    r.decision.resulting_version = Some(into);
    Receipt::issue(r.claim, r.claim_sig, r.decision, coord)
}

/// The run's max_staleness is pinned on first contact, and every merged receipt must
/// name a staleness within it and the version that staleness makes from its base.
#[test]
fn a_coordinator_cannot_widen_max_staleness_or_misstate_where_an_update_went() {
    let (w, k) = (Identity::generate(), Identity::generate());
    let me = w.public_hex();
    let audit = |staleness: u64, receipts: &[Receipt], record: &Record| {
        let (book, served) = fake(&k);
        {
            let mut b = book.lock().unwrap();
            b.max_staleness = Some(staleness);
            for r in receipts {
                b.append(r);
            }
        }
        let mut c = client(&served.url, &w);
        audit_receipts(&mut c, &me, record, &Seen::default()).map_err(|e| e.to_string())
    };
    let fresh = || {
        let root = tempfile::tempdir().unwrap();
        let record = Record::open(root.path(), &me).unwrap();
        (root, record)
    };
    // K = 1: one version stale, into v1 + 1 + 1 = v3, is within the rule.
    let (_root, record) = fresh();
    let ok = [merged(&w, &k, 1, 0, 2), merged(&w, &k, 2, 1, 3)];
    assert_eq!(audit(1, &ok, &record).unwrap().accepted, 2);
    // The same coordinator announcing another K later is refused, naming both.
    let e = audit(2, &ok, &record).unwrap_err();
    assert!(
        e.contains("announces max_staleness 2") && e.contains("announced 1"),
        "{e}"
    );
    for (bad, why) in [
        // Two versions stale where the run allows one.
        (merged(&w, &k, 3, 2, 4), "max_staleness is 1"),
        // Staleness 0 (its own base) but it made v3: merged into a base it was not
        // trained from.
        (merged(&w, &k, 3, 0, 3), "makes version 2"),
        // Staleness 1 named, but the version made is v4.
        (merged(&w, &k, 3, 1, 4), "makes version 3"),
    ] {
        let (_root, record) = fresh();
        let e = audit(1, &[ok[0].clone(), bad], &record).unwrap_err();
        assert!(
            e.contains("ledger audit failed") && e.contains(why),
            "{why}: {e}"
        );
    }
    // With K = 0 (also what a coordinator that does not say means) a stale merge fails.
    let (_root, record) = fresh();
    let e = audit(0, &ok, &record).unwrap_err();
    assert!(
        e.contains("staleness 1") && e.contains("max_staleness is 0"),
        "{e}"
    );
}

/// A merged receipt may not place an update in a later round than the version the
/// coordinator's reply to it named: the update joined the round open when it was taken.
#[test]
fn a_receipt_may_not_merge_an_update_into_a_round_after_the_one_its_reply_named() {
    let (w, k) = (Identity::generate(), Identity::generate());
    let me = w.public_hex();
    // K = 2, trained from v1, and the reply said the block was at v2.
    for (s, into, ok) in [(1, 3, true), (2, 4, false)] {
        let root = tempfile::tempdir().unwrap();
        let record = Record::open(root.path(), &me).unwrap();
        let mut u = upload(7, "stale 7", true);
        u.block_version = Some(2);
        record.record(&u).unwrap();
        let (book, served) = fake(&k);
        {
            let mut b = book.lock().unwrap();
            b.max_staleness = Some(2);
            b.append(&merged(&w, &k, 7, s, into));
        }
        let mut c = client(&served.url, &w);
        match audit_receipts(&mut c, &me, &record, &Seen::default()) {
            Ok(a) => assert!(ok && a.pending == 0 && a.accepted == 1, "s {s}: {a}"),
            Err(e) => assert!(
                !ok && e.to_string().contains("joined round 3")
                    && e.to_string().contains("block was at version 2"),
                "s {s}: {e}"
            ),
        }
    }
}
