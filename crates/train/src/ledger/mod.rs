//! The coordinator's receipt ledger: every accepted or rejected update's [`Receipt`] in
//! an append-only Merkle log (RFC 6962 via `ct-merkle`), durable in SQLite, with signed
//! tree heads and the inclusion and consistency proofs workers check them with.
//!
//! Tables (created by [`Ledger::open`], never updated or deleted from):
//! `ledger(idx INTEGER PRIMARY KEY, receipt TEXT NOT NULL)` holds each receipt's JSON at
//! its log index, `tree_heads(size INTEGER PRIMARY KEY, head TEXT NOT NULL)` the first
//! signed head of each log size.
//!
//! The tree is ct-merkle's `MemoryBackedTree`, rebuilt from the table at open, so it
//! holds every leaf's bytes in memory (about a kilobyte a receipt; one receipt per
//! upload). That tree proves only against its current size, so a proof against an older
//! head rebuilds that prefix as a fresh `MemoryBackedTree` (O(size) hashing) rather than
//! doing any proof arithmetic here; proofs against the latest size, the common case, use
//! the live tree.
//!
//! [`Ledger::append`] is one INSERT of its own. A caller that appends inside a
//! transaction it later rolls back must reopen the ledger: the next append notices a
//! tree out of step with the table and refuses.
use std::collections::BTreeMap;
use std::path::Path;

use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::receipt::{
    verify_consistency, ConsistencyProof, InclusionProof, LogHash, Receipt, TreeHead,
};
use blocktrain_protocol::ProtocolError;
use ct_merkle::mem_backed_tree::MemoryBackedTree;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

use crate::{NodeError, Result};

mod offline;

pub use offline::{open_read_only, totals, verify_all, VerifyReport, WorkerTotals};

type Tree = MemoryBackedTree<LogHash, Vec<u8>>;

const TABLES: &str = "
CREATE TABLE IF NOT EXISTS ledger (idx INTEGER PRIMARY KEY, receipt TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tree_heads (size INTEGER PRIMARY KEY, head TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_workers (idx INTEGER PRIMARY KEY, worker TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ledger_workers_by ON ledger_workers (worker, idx);
";

/// Indexes the receipts the worker index lacks (a ledger older than it, or a crash
/// between the two inserts); rows that do not parse are left to `verify_all` to name.
const INDEX_WORKERS: &str = "
INSERT OR IGNORE INTO ledger_workers (idx, worker)
SELECT idx, json_extract(receipt, '$.claim.worker') FROM ledger
WHERE idx > (SELECT COALESCE(MAX(idx), -1) FROM ledger_workers)
  AND json_valid(receipt) AND json_extract(receipt, '$.claim.worker') IS NOT NULL;
";

fn bad(what: String) -> NodeError {
    NodeError::Rejected(what)
}

/// A protocol error's message without its kind (the ledger error says what failed).
fn detail(e: ProtocolError) -> String {
    match e {
        ProtocolError::Malformed(m)
        | ProtocolError::Rejected(m)
        | ProtocolError::Unauthenticated(m) => m,
    }
}

fn parse_receipt(idx: u64, text: &str) -> Result<Receipt> {
    serde_json::from_str(text).map_err(|e| bad(format!("ledger entry {idx}: does not parse: {e}")))
}

fn parse_head(size: u64, text: &str) -> Result<TreeHead> {
    serde_json::from_str(text)
        .map_err(|e| bad(format!("tree head of size {size}: does not parse: {e}")))
}

/// Every stored receipt in index order, each with its index; a gap or an entry that does
/// not parse is an error naming the index.
fn read_entries(
    conn: &Connection,
    mut each: impl FnMut(u64, Receipt) -> Result<()>,
) -> Result<u64> {
    let mut stmt = conn.prepare("SELECT idx, receipt FROM ledger ORDER BY idx")?;
    let mut rows = stmt.query([])?;
    let mut expected = 0u64;
    while let Some(row) = rows.next()? {
        let idx = row.get::<_, i64>(0)? as u64;
        if idx != expected {
            return Err(bad(format!(
                "ledger entry {expected}: missing (the next stored entry is {idx})"
            )));
        }
        let text: String = row
            .get(1)
            .map_err(|e| bad(format!("ledger entry {idx}: not text: {e}")))?;
        each(idx, parse_receipt(idx, &text)?)?;
        expected += 1;
    }
    Ok(expected)
}

fn read_heads(conn: &Connection) -> Result<Vec<TreeHead>> {
    let mut stmt = conn.prepare("SELECT size, head FROM tree_heads ORDER BY size")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)))
    })?;
    let mut heads = Vec::new();
    for row in rows {
        let (size, text) = row?;
        let text = text.map_err(|e| bad(format!("tree head of size {size}: not text: {e}")))?;
        let head = parse_head(size, &text)?;
        if head.size != size {
            return Err(bad(format!(
                "tree head of size {size}: stored under size {size} but says {}",
                head.size
            )));
        }
        heads.push(head);
    }
    Ok(heads)
}

fn prefix(tree: &Tree, size: u64) -> Tree {
    let mut t = Tree::new();
    for leaf in &tree.items()[..size as usize] {
        t.push(leaf.clone());
    }
    t
}

/// The receipts' Merkle tree, read from the database: proofs only, no key (what a
/// read-only tool needs; the coordinator's [`Ledger`] wraps one).
#[derive(Debug)]
pub struct Log {
    tree: Tree,
}

impl Log {
    /// Loads every stored receipt into the tree; refuses, naming the index, at a gap or
    /// an entry that does not parse (their signatures are [`verify_all`]'s to check).
    pub fn load(conn: &Connection) -> Result<Log> {
        let mut tree = Tree::new();
        read_entries(conn, |_, r| {
            tree.push(r.leaf_bytes());
            Ok(())
        })?;
        Ok(Log { tree })
    }

    /// Receipts in the log.
    pub fn len(&self) -> u64 {
        self.tree.len()
    }

    /// Whether the log holds no receipt.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// The tree hash of the whole log.
    pub fn root(&self) -> Vec<u8> {
        self.tree.root().as_bytes().to_vec()
    }

    fn sized(&self, size: u64) -> Result<std::borrow::Cow<'_, Tree>> {
        match size {
            s if s > self.len() => Err(NodeError::NotFound(format!(
                "no log of {s} receipts: the ledger holds {}",
                self.len()
            ))),
            s if s == self.len() => Ok(std::borrow::Cow::Borrowed(&self.tree)),
            s => Ok(std::borrow::Cow::Owned(prefix(&self.tree, s))),
        }
    }

    /// Proof that receipt `index` is in the log of the first `size` receipts.
    pub fn prove_inclusion(&self, index: u64, size: u64) -> Result<InclusionProof> {
        if index >= size {
            return Err(NodeError::NotFound(format!(
                "receipt {index} is not in a log of {size} receipts"
            )));
        }
        let tree = self.sized(size)?;
        Ok(InclusionProof {
            index,
            size,
            hashes: hex::encode(tree.prove_inclusion(index as usize).as_bytes()),
        })
    }

    /// Proof that the log of `old_size` receipts is a prefix of that of `new_size`.
    pub fn prove_consistency(&self, old_size: u64, new_size: u64) -> Result<ConsistencyProof> {
        if old_size > new_size {
            return Err(NodeError::Rejected(format!(
                "no consistency proof from {old_size} receipts back to {new_size}"
            )));
        }
        let tree = self.sized(new_size)?;
        // ct-merkle has no proof from the empty log; the empty proof stands for it.
        let hashes = match old_size {
            0 => String::new(),
            _ => hex::encode(
                tree.prove_consistency((new_size - old_size) as usize)
                    .as_bytes(),
            ),
        };
        Ok(ConsistencyProof {
            old_size,
            new_size,
            hashes,
        })
    }
}

/// Where a page of receipts starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    /// Oldest first, after this index (None: from the start).
    After(Option<u64>),
    /// Newest first, before this index (None: from the end).
    Before(Option<u64>),
}

/// The coordinator's ledger: the log, and the key that signs its heads.
#[derive(Debug)]
pub struct Ledger {
    log: Log,
    id: Identity,
}

impl Ledger {
    /// Creates the tables if absent and loads every receipt into the tree (refusing to
    /// open, with the index, if a stored receipt does not parse).
    pub fn open(conn: &Connection, coordinator: Identity) -> Result<Ledger> {
        conn.execute_batch(TABLES)?;
        conn.execute_batch(INDEX_WORKERS)?;
        let log = Log::load(conn)?;
        if let Some(head) = Self::latest_head(conn)? {
            if head.coordinator != coordinator.public_hex() {
                // A new key cannot extend the old key's heads: workers holding them will
                // see a different coordinator. Loud, but not fatal (a lost key file).
                tracing::warn!(
                    old = %head.coordinator,
                    new = %coordinator.public_hex(),
                    "the ledger's tree heads were signed by another coordinator key"
                );
            }
        }
        Ok(Ledger {
            log,
            id: coordinator,
        })
    }

    /// The log (proofs, size, root).
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Receipts in the log.
    pub fn len(&self) -> u64 {
        self.log.len()
    }

    /// Whether the log holds no receipt.
    pub fn is_empty(&self) -> bool {
        self.log.is_empty()
    }

    /// Appends a receipt this coordinator issued; returns its index.
    pub fn append(&mut self, conn: &Connection, receipt: &Receipt) -> Result<u64> {
        receipt
            .verify()
            .map_err(|e| bad(format!("receipt to append: {}", detail(e))))?;
        if receipt.coordinator != self.id.public_hex() {
            return Err(bad(
                "receipt to append was signed by another coordinator".into()
            ));
        }
        let idx = self.len();
        let stored: i64 =
            conn.query_row("SELECT COALESCE(MAX(idx) + 1, 0) FROM ledger", [], |r| {
                r.get(0)
            })?;
        if stored as u64 != idx {
            return Err(NodeError::Config(format!(
                "receipt ledger out of step: {idx} receipts in memory, {stored} stored; reopen it"
            )));
        }
        let json = serde_json::to_string(receipt).expect("receipts serialize");
        conn.execute(
            "INSERT INTO ledger (idx, receipt) VALUES (?1, ?2)",
            params![idx as i64, json],
        )?;
        conn.execute(
            "INSERT OR REPLACE INTO ledger_workers (idx, worker) VALUES (?1, ?2)",
            params![idx as i64, receipt.claim.worker],
        )?;
        self.log.tree.push(receipt.leaf_bytes());
        Ok(idx)
    }

    /// Signs and stores a head of the log as it is now. One head per size: when the log
    /// has not grown since the last one, that head comes back unchanged (its time is when
    /// the log first reached this size).
    pub fn sign_head(&self, conn: &Connection, now_ms: u64) -> Result<TreeHead> {
        let size = self.len();
        if let Some(head) = Self::head(conn, size)? {
            return Ok(head);
        }
        let head = TreeHead::sign(size, &self.log.root(), now_ms, &self.id);
        let json = serde_json::to_string(&head).expect("tree heads serialize");
        conn.execute(
            "INSERT INTO tree_heads (size, head) VALUES (?1, ?2)",
            params![size as i64, json],
        )?;
        Ok(head)
    }

    /// The stored head of the largest log, if any head was signed.
    pub fn latest_head(conn: &Connection) -> Result<Option<TreeHead>> {
        let row: Option<(i64, String)> = conn
            .query_row(
                "SELECT size, head FROM tree_heads ORDER BY size DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(size, text)| parse_head(size as u64, &text))
            .transpose()
    }

    /// The stored head of the log of `size` receipts.
    pub fn head(conn: &Connection, size: u64) -> Result<Option<TreeHead>> {
        let text: Option<String> = conn
            .query_row(
                "SELECT head FROM tree_heads WHERE size = ?1",
                [size as i64],
                |r| r.get(0),
            )
            .optional()?;
        text.map(|t| parse_head(size, &t)).transpose()
    }

    /// Proof that receipt `index` is in the log of the head of `size`.
    pub fn prove_inclusion(&self, index: u64, size: u64) -> Result<InclusionProof> {
        self.log.prove_inclusion(index, size)
    }

    /// Proof that the log of `old_size` receipts is a prefix of that of `new_size`.
    pub fn prove_consistency(&self, old_size: u64, new_size: u64) -> Result<ConsistencyProof> {
        self.log.prove_consistency(old_size, new_size)
    }

    /// The receipt at `index`.
    pub fn receipt(conn: &Connection, index: u64) -> Result<Option<Receipt>> {
        let text: Option<String> = conn
            .query_row(
                "SELECT receipt FROM ledger WHERE idx = ?1",
                [index as i64],
                |r| r.get(0),
            )
            .optional()?;
        text.map(|t| parse_receipt(index, &t)).transpose()
    }

    /// Every receipt whose claim names `worker` (public key hex), in log order.
    pub fn receipts_of(conn: &Connection, worker: &str) -> Result<Vec<(u64, Receipt)>> {
        let mut stmt = conn.prepare(
            "SELECT idx, receipt FROM ledger WHERE json_extract(receipt, '$.claim.worker') = ?1 ORDER BY idx",
        )?;
        let rows = stmt.query_map([worker], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
        })?;
        rows.map(|row| {
            let (idx, text) = row?;
            Ok((idx, parse_receipt(idx, &text)?))
        })
        .collect()
    }

    /// One page of receipts: `worker`'s (None: everyone's), oldest first from index
    /// `after` (exclusive) or newest first below `before` (exclusive), at most `limit`.
    pub fn receipts_page(
        conn: &Connection,
        worker: Option<&str>,
        from: Page,
        limit: usize,
    ) -> Result<Vec<(u64, Receipt)>> {
        // One worker's receipts through its index; everyone's by the primary key.
        let source = match worker {
            Some(_) => "ledger_workers w JOIN ledger l ON l.idx = w.idx WHERE w.worker = ?1 AND",
            None => "ledger l WHERE ?1 IS NULL AND",
        };
        let (sql, at) = match from {
            Page::After(i) => (
                format!("SELECT l.idx, l.receipt FROM {source} l.idx > ?2 ORDER BY l.idx LIMIT ?3"),
                i.map_or(-1, |i| i as i64),
            ),
            Page::Before(i) => (
                format!(
                    "SELECT l.idx, l.receipt FROM {source} l.idx < ?2 ORDER BY l.idx DESC LIMIT ?3"
                ),
                i.map_or(i64::MAX, |i| i as i64),
            ),
        };
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params![worker, at, limit as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
        })?;
        rows.map(|row| {
            let (idx, text) = row?;
            Ok((idx, parse_receipt(idx, &text)?))
        })
        .collect()
    }

    /// Every receipt in log order, each with its index.
    pub fn entries(conn: &Connection) -> Result<Vec<(u64, Receipt)>> {
        let mut out = Vec::new();
        read_entries(conn, |idx, r| {
            out.push((idx, r));
            Ok(())
        })?;
        Ok(out)
    }
}
