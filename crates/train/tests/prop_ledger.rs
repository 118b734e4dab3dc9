//! Property tests of the receipt ledger's readers on a SQLite file someone else could
//! have edited: whatever text replaces a stored receipt or tree head, `verify_all` (and
//! the other readers) return an error naming the entry, and never panic.
use std::sync::OnceLock;

use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::receipt::{Claim, Decision, Receipt, TreeHead, RECEIPT_VERSION};
use blocktrain_train::ledger::{totals, verify_all, Ledger, Log};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use rusqlite::{params, Connection};

/// Receipts in the test ledger; a head is signed at every size, 0 included, so a
/// changed entry's root mismatch names that one entry.
const N: usize = 4;

struct Stored {
    receipts: Vec<String>,
    /// `(size, head JSON)` for sizes 0..=N.
    heads: Vec<(i64, String)>,
}

/// The stored texts of an honest ledger, built once (signing is the slow part).
fn stored() -> &'static Stored {
    static S: OnceLock<Stored> = OnceLock::new();
    S.get_or_init(|| {
        let coord = Identity::from_secret(&[1; 32]).unwrap();
        let worker = Identity::from_secret(&[2; 32]).unwrap();
        let conn = Connection::open_in_memory().unwrap();
        let mut ledger = Ledger::open(&conn, coord.clone()).unwrap();
        ledger.sign_head(&conn, 1).unwrap();
        for i in 0..N as i64 {
            let claim = Claim {
                version: RECEIPT_VERSION,
                worker: worker.public_hex(),
                lease: i,
                block: i as u32,
                base_version: 1,
                update_blake3: blake3::hash(&i.to_le_bytes()).to_hex().to_string(),
                steps: 10 * (i + 1),
                data_bytes: 1000,
                local_loss: Some(2.0 + i as f64 / 3.0),
            };
            // Entry 1 is a rejection without a valid claim, entry 2 a signed rejection.
            let accepted = i != 1 && i != 2;
            let sig = (i != 1).then(|| claim.sign(&worker));
            let decision = Decision {
                accepted,
                reason: (!accepted).then(|| "norm over the limit".into()),
                resulting_version: accepted.then_some(2),
                heldout_before: Some(3.0),
                heldout_after: accepted.then_some(2.75),
                time_ms: 100 + i as u64,
                staleness: 0,
            };
            let r = Receipt::issue(claim, sig, decision, &coord);
            ledger.append(&conn, &r).unwrap();
            ledger.sign_head(&conn, 200 + i as u64).unwrap();
        }
        let col = |sql: &str| -> Vec<(i64, String)> {
            let mut st = conn.prepare(sql).unwrap();
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
            rows.map(Result::unwrap).collect()
        };
        let receipts = col("SELECT idx, receipt FROM ledger ORDER BY idx")
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let heads = col("SELECT size, head FROM tree_heads ORDER BY size");
        assert_eq!(heads.len(), N + 1);
        Stored { receipts, heads }
    })
}

/// A fresh in-memory ledger holding the honest texts.
fn honest() -> Connection {
    let s = stored();
    let conn = Connection::open_in_memory().unwrap();
    Ledger::open(&conn, Identity::from_secret(&[1; 32]).unwrap()).unwrap();
    for (i, t) in s.receipts.iter().enumerate() {
        conn.execute(
            "INSERT INTO ledger (idx, receipt) VALUES (?1, ?2)",
            params![i as i64, t],
        )
        .unwrap();
    }
    for (size, t) in &s.heads {
        conn.execute(
            "INSERT INTO tree_heads (size, head) VALUES (?1, ?2)",
            params![size, t],
        )
        .unwrap();
    }
    conn
}

/// Replaces some characters of `text` (it stays a valid string, so SQLite keeps TEXT).
fn mutate(text: &str, edits: &[(Index, char)]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for (at, c) in edits {
        let i = at.index(chars.len());
        chars[i] = *c;
    }
    chars.into_iter().collect()
}

/// Text a hostile edit could leave in a receipt or head cell.
#[derive(Clone, Debug)]
enum Replacement {
    Any(String),
    Json(String),
    Mutated(Vec<(Index, char)>),
    Other(Index),
}

fn replacement() -> impl Strategy<Value = Replacement> {
    let ch = prop_oneof![any::<char>(), proptest::char::range('0', '9'), Just('"')];
    prop_oneof![
        "\\PC{0,64}".prop_map(Replacement::Any),
        prop_oneof![
            Just("null".to_string()),
            Just("{}".to_string()),
            Just("[]".to_string()),
            "\\{\"[a-z_]{1,12}\":[0-9a-z\"]{0,8}\\}",
        ]
        .prop_map(Replacement::Json),
        vec((any::<Index>(), ch), 1..3).prop_map(Replacement::Mutated),
        any::<Index>().prop_map(Replacement::Other),
    ]
}

/// The text that replaces `original`, taken from `pool` for [`Replacement::Other`].
fn apply(r: &Replacement, original: &str, pool: &[String]) -> String {
    match r {
        Replacement::Any(s) | Replacement::Json(s) => s.clone(),
        Replacement::Mutated(edits) => mutate(original, edits),
        Replacement::Other(i) => pool[i.index(pool.len())].clone(),
    }
}

/// Every reader of the ledger on this database: none may panic.
fn read_everything(conn: &Connection) {
    let _ = Log::load(conn);
    let _ = Ledger::entries(conn);
    let _ = Ledger::latest_head(conn);
    let _ = totals(conn);
    for i in 0..=N as u64 {
        let _ = Ledger::receipt(conn, i);
        let _ = Ledger::head(conn, i);
    }
}

proptest! {
    // Each case builds a database and checks every signature in it (~3 ms).
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn a_replaced_receipt_is_an_error_naming_its_entry(
        k in 0..N,
        r in replacement(),
    ) {
        let s = stored();
        let text = apply(&r, &s.receipts[k], &s.receipts);
        let conn = honest();
        conn.execute("UPDATE ledger SET receipt = ?1 WHERE idx = ?2", params![text, k as i64])
            .unwrap();
        read_everything(&conn);
        let out = verify_all(&conn);
        if text == s.receipts[k] {
            prop_assert!(out.is_ok(), "{:?}", out);
        } else {
            let e = out.expect_err("a changed ledger verified").to_string();
            prop_assert!(
                e.contains(&format!("ledger entry {k}:"))
                    || e.contains(&format!("ledger entries {k}..={k}:")),
                "error does not name entry {}: {}", k, e
            );
        }
    }

    #[test]
    fn a_replaced_tree_head_is_an_error_naming_it(
        k in 0..=N,
        r in replacement(),
    ) {
        let s = stored();
        let pool: Vec<String> = s.heads.iter().map(|(_, t)| t.clone()).collect();
        let (size, original) = &s.heads[k];
        let text = apply(&r, original, &pool);
        let conn = honest();
        conn.execute("UPDATE tree_heads SET head = ?1 WHERE size = ?2", params![text, size])
            .unwrap();
        read_everything(&conn);
        let out = verify_all(&conn);
        // A signature's hex reads the same in either case: the head says what it said.
        let same = serde_json::from_str::<TreeHead>(&text).is_ok_and(|mut h| {
            h.sig.make_ascii_lowercase();
            h == serde_json::from_str::<TreeHead>(original).unwrap()
        });
        if same {
            prop_assert!(out.is_ok(), "{:?}", out);
        } else {
            let e = out.expect_err("a changed tree head verified").to_string();
            prop_assert!(
                e.contains(&format!("tree head of size {size}")),
                "error does not name the head of size {}: {}", size, e
            );
        }
    }

    /// Receipts deleted, or rows stored under other indices or sizes (negative ones
    /// too). (A deleted head is not an error: heads are optional checkpoints.)
    #[test]
    fn moved_or_missing_rows_are_errors(
        k in 0..N,
        to in prop_oneof![Just(None), (-3i64..10).prop_map(Some), any::<i64>().prop_map(Some)],
        head in any::<bool>(),
    ) {
        let conn = honest();
        let (table, col) = if head { ("tree_heads", "size") } else { ("ledger", "idx") };
        let sql = match to {
            None => format!("DELETE FROM {table} WHERE {col} = ?1"),
            Some(to) => format!("UPDATE OR IGNORE {table} SET {col} = {to} WHERE {col} = ?1"),
        };
        let changed = conn.execute(&sql, params![k as i64]).unwrap();
        read_everything(&conn);
        let out = verify_all(&conn);
        if changed > 0 && to != Some(k as i64) && !(head && to.is_none()) {
            prop_assert!(out.is_err(), "{} row {} moved to {:?}: verified", table, k, to);
        }
    }

    /// Bytes that are not a string at all (a BLOB, or TEXT that is not UTF-8): an
    /// error, never a panic.
    #[test]
    fn non_text_cells_are_errors(
        k in 0..N,
        bytes in vec(any::<u8>(), 0..64),
        as_text in any::<bool>(),
        head in any::<bool>(),
    ) {
        let conn = honest();
        let sql = match (head, as_text) {
            (false, false) => "UPDATE ledger SET receipt = ?1 WHERE idx = ?2",
            (false, true) => "UPDATE ledger SET receipt = CAST(?1 AS TEXT) WHERE idx = ?2",
            (true, false) => "UPDATE tree_heads SET head = ?1 WHERE size = ?2",
            (true, true) => "UPDATE tree_heads SET head = CAST(?1 AS TEXT) WHERE size = ?2",
        };
        conn.execute(sql, params![bytes, k as i64]).unwrap();
        read_everything(&conn);
        let out = verify_all(&conn);
        let original = if head { &stored().heads[k].1 } else { &stored().receipts[k] };
        if bytes != original.as_bytes() || !as_text {
            prop_assert!(out.is_err());
        }
    }
}

#[test]
fn the_honest_ledger_verifies() {
    let report = verify_all(&honest()).unwrap();
    assert_eq!((report.receipts, report.heads), (N as u64, N as u64 + 1));
}

/// `verify_all` promises an error naming the first bad entry; a receipt (or head) cell
/// holding a BLOB or non-UTF-8 text fails instead with rusqlite's bare conversion error
/// ("state database: Invalid column type Blob at index: 1, name: receipt"), which names
/// no entry: `read_entries` and `read_heads` (ledger.rs) read the cell with
/// `get::<_, String>(1)?`.
#[test]
fn a_non_text_cell_is_an_error_naming_its_entry() {
    for (sql, name) in [
        (
            "UPDATE ledger SET receipt = x'ff00' WHERE idx = 2",
            "ledger entry 2",
        ),
        (
            "UPDATE ledger SET receipt = CAST(x'ff00' AS TEXT) WHERE idx = 2",
            "ledger entry 2",
        ),
        (
            "UPDATE tree_heads SET head = x'ff00' WHERE size = 2",
            "tree head of size 2",
        ),
    ] {
        let conn = honest();
        conn.execute_batch(sql).unwrap();
        let e = verify_all(&conn).unwrap_err().to_string();
        assert!(e.contains(name), "{sql}: {e}");
    }
}
