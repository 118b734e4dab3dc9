//! The coordinator's durable state: one SQLite database (WAL, synchronous=FULL) for
//! runs, workers, leases, rounds and updates, and a directory of content-addressed
//! blobs (`blobs/<blake3>.safetensors`) for checkpoints, momentum buffers and pending
//! updates.
//!
//! Crash safety: a blob is written (temp file, fsync, rename) before any row names it,
//! and every state change that spans rows (accepting an update, committing a version) is
//! one transaction, so after `kill -9` the database names only complete blobs and an
//! update is either wholly accepted or absent. Blobs no row names are removed at startup.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use blocktrain_model::checkpoint::{content_hash, write_atomic};
use rusqlite::{params, Connection, OptionalExtension};

use crate::{io_err, NodeError, Result};

/// Schema version this build reads and writes.
pub const SCHEMA: i64 = 1;

const TABLES: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    block INTEGER PRIMARY KEY, version INTEGER NOT NULL, weights TEXT NOT NULL,
    wire TEXT NOT NULL, momentum TEXT, steps INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    block INTEGER NOT NULL, version INTEGER NOT NULL, weights TEXT NOT NULL,
    wire TEXT NOT NULL, momentum TEXT, updates INTEGER NOT NULL, steps INTEGER NOT NULL,
    committed_ms INTEGER NOT NULL, pruned INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (block, version));
CREATE TABLE IF NOT EXISTS workers (
    key TEXT PRIMARY KEY, registered_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,
    device TEXT NOT NULL, memory_bytes INTEGER NOT NULL, step_rate REAL,
    data_hash TEXT, data_bytes INTEGER, last_block INTEGER);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY, worker TEXT NOT NULL, block INTEGER NOT NULL,
    version INTEGER NOT NULL, slot INTEGER NOT NULL, steps INTEGER NOT NULL,
    seed INTEGER NOT NULL, issued_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
    state TEXT NOT NULL, public INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS leases_round ON leases (block, version, state);
CREATE INDEX IF NOT EXISTS leases_state ON leases (state, expires_ms);
CREATE INDEX IF NOT EXISTS leases_worker ON leases (worker, state);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY, lease INTEGER, worker TEXT NOT NULL, block INTEGER,
    version INTEGER, bytes INTEGER NOT NULL, hash TEXT, steps INTEGER, loss REAL,
    state TEXT NOT NULL, reason TEXT, received_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS updates_round ON updates (block, version, state);
CREATE UNIQUE INDEX IF NOT EXISTS updates_one_per_lease ON updates (lease) WHERE state != 'rejected';
CREATE INDEX IF NOT EXISTS updates_lease ON updates (lease);
CREATE INDEX IF NOT EXISTS updates_block_time ON updates (block, received_ms);
CREATE INDEX IF NOT EXISTS updates_hash ON updates (hash);
CREATE TABLE IF NOT EXISTS traffic (
    worker TEXT NOT NULL, block INTEGER NOT NULL, up INTEGER NOT NULL DEFAULT 0,
    down INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (worker, block));
CREATE TABLE IF NOT EXISTS claims (
    update_id INTEGER PRIMARY KEY, claim TEXT NOT NULL, sig TEXT);
CREATE TABLE IF NOT EXISTS screening (
    update_id INTEGER PRIMARY KEY, before REAL NOT NULL, after REAL NOT NULL);
CREATE TABLE IF NOT EXISTS version_loss (
    block INTEGER NOT NULL, version INTEGER NOT NULL, heldout REAL NOT NULL,
    time_ms INTEGER NOT NULL, PRIMARY KEY (block, version));
CREATE TABLE IF NOT EXISTS receipted (
    update_id INTEGER PRIMARY KEY, receipt INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS invites (token TEXT PRIMARY KEY, worker TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS flags (
    worker TEXT PRIMARY KEY, failed_checks INTEGER NOT NULL, last_reason TEXT NOT NULL);
";

/// Lease states.
pub mod lease_state {
    /// Training; renewed by heartbeats.
    pub const ACTIVE: &str = "active";
    /// Its update arrived.
    pub const DELIVERED: &str = "delivered";
    /// No heartbeat in time; its slot was freed.
    pub const EXPIRED: &str = "expired";
    /// The round closed without it.
    pub const SUPERSEDED: &str = "superseded";
    /// Its one upload was refused (screen, norm, claim, shape): the lease is closed, and
    /// the slot is re-leased with a fresh seed.
    pub const REFUSED: &str = "refused";
    /// A spot check found its update false: closed, and never revived.
    pub const VOID: &str = "void";
}

/// Update states.
pub mod update_state {
    /// Accepted, waiting for its round to close.
    pub const PENDING: &str = "pending";
    /// Merged into a version.
    pub const APPLIED: &str = "applied";
    /// Refused; `reason` says why.
    pub const REJECTED: &str = "rejected";
}

/// A block's current head.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockHead {
    /// Block index.
    pub block: usize,
    /// Committed version.
    pub version: u64,
    /// blake3 of its weights blob (fp32, the master copy merges apply to).
    pub weights: String,
    /// blake3 of the copy workers download (the run's checkpoint codec; may equal `weights`).
    pub wire: String,
    /// blake3 of its outer-momentum blob.
    pub momentum: Option<String>,
    /// Local steps merged into it so far (summed over all workers).
    pub steps: i64,
}

/// A lease row.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseRow {
    /// Id.
    pub id: i64,
    /// Holder.
    pub worker: String,
    /// Block.
    pub block: usize,
    /// Base version.
    pub version: u64,
    /// Shard slot.
    pub slot: u32,
    /// Local steps.
    pub steps: i64,
    /// Seed.
    pub seed: u64,
    /// Deadline.
    pub expires_ms: u64,
    /// State.
    pub state: String,
    /// Trained on the run's shard although the worker has its own data (a check lease).
    pub public: bool,
}

/// A pending update of an open round.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingUpdate {
    /// Id.
    pub id: i64,
    /// blake3 of the body blob.
    pub hash: String,
    /// Local steps it represents.
    pub steps: i64,
    /// When it arrived.
    pub received_ms: u64,
}

/// An update record for reports.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpdateRecord {
    /// Id.
    pub id: i64,
    /// Worker key (as claimed, for unauthenticated rejections).
    pub worker: String,
    /// Block.
    pub block: Option<usize>,
    /// Base version.
    pub version: Option<u64>,
    /// Body size.
    pub bytes: u64,
    /// pending / applied / rejected.
    pub state: String,
    /// Why it was rejected.
    pub reason: Option<String>,
    /// Worker's reported mean loss.
    pub loss: Option<f64>,
}

/// A new update row.
#[derive(Clone, Debug, Default)]
pub struct NewUpdate<'a> {
    /// Lease id, if one was named.
    pub lease: Option<i64>,
    /// Worker key.
    pub worker: &'a str,
    /// Block.
    pub block: Option<usize>,
    /// Base version.
    pub version: Option<u64>,
    /// Body size.
    pub bytes: u64,
    /// Body blob, if stored.
    pub hash: Option<String>,
    /// Steps.
    pub steps: Option<i64>,
    /// Loss.
    pub loss: Option<f64>,
    /// State.
    pub state: &'a str,
    /// Reason (rejections).
    pub reason: Option<String>,
}

/// Bytes moved, per worker and block.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Traffic {
    /// Worker key.
    pub worker: String,
    /// Block.
    pub block: usize,
    /// Bytes the worker uploaded (updates, accepted or not).
    pub up: u64,
    /// Bytes the worker downloaded (checkpoints).
    pub down: u64,
}

/// Durable state of one coordinator.
pub struct Store {
    conn: Connection,
    blobs: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.blobs.display())
    }
}

impl Store {
    /// Opens (or creates) the state in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let blobs = dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let conn = Connection::open(dir.join("state.sqlite"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(TABLES)?;
        let store = Store { conn, blobs };
        match store.meta("schema")? {
            None => store.set_meta("schema", &SCHEMA.to_string())?,
            Some(v) if v == SCHEMA.to_string() => {}
            Some(v) => {
                return Err(NodeError::Config(format!(
                    "{} has state schema {v}; this build reads {SCHEMA}",
                    dir.display()
                )))
            }
        }
        // Databases from before check leases: add the column (default: not one). After
        // the schema check, so a database this build refuses is left as it was.
        let has_public: bool = store.conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('leases') WHERE name = 'public'",
            [],
            |r| r.get(0),
        )?;
        if !has_public {
            store
                .conn
                .execute_batch("ALTER TABLE leases ADD COLUMN public INTEGER NOT NULL DEFAULT 0")?;
        }
        Ok(store)
    }

    /// Stops fsyncing at every commit (`synchronous=NORMAL`, WAL) and returns the WAL
    /// file, whose fsync then makes every earlier commit durable: the server's group
    /// commit takes over durability.
    pub fn defer_sync(&self, dir: &Path) -> Result<PathBuf> {
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(dir.join("state.sqlite-wal"))
    }

    /// The database connection (the ledger keeps its tables in the same file).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    // ---- trust: claims, screening, held-out history, flagged workers ----

    /// Stores the worker's claim (JSON) and its signature for an update.
    pub fn put_claim(&self, update: i64, claim: &str, sig: Option<&str>) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO claims (update_id, claim, sig) VALUES (?1, ?2, ?3)",
            params![update, claim, sig],
        )?;
        Ok(())
    }

    /// The claim stored for an update.
    pub fn claim(&self, update: i64) -> Result<Option<(String, Option<String>)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT claim, sig FROM claims WHERE update_id = ?1",
                [update],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Records an update's held-out loss before and after applying it.
    pub fn put_screening(&self, update: i64, before: f64, after: f64) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO screening (update_id, before, after) VALUES (?1, ?2, ?3)",
            params![update, before, after],
        )?;
        Ok(())
    }

    /// An update's held-out loss before and after.
    pub fn screening(&self, update: i64) -> Result<Option<(f64, f64)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT before, after FROM screening WHERE update_id = ?1",
                [update],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Records a version's held-out loss.
    pub fn put_version_loss(&self, block: usize, version: u64, loss: f64, now: u64) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO version_loss (block, version, heldout, time_ms) VALUES (?1, ?2, ?3, ?4)",
            params![block as i64, version as i64, loss, now as i64],
        )?;
        Ok(())
    }

    /// The held-out change (after - before) of the last `limit` accepted updates of
    /// `block`, oldest first.
    pub fn recent_screen_changes(&self, block: usize, limit: usize) -> Result<Vec<f64>> {
        let mut st = self.conn.prepare(
            "SELECT s.after - s.before FROM screening s JOIN updates u ON u.id = s.update_id
             WHERE u.block = ?1 AND u.state != 'rejected' ORDER BY u.id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![block as i64, limit as i64], |r| r.get(0))?;
        let mut v: Vec<f64> = rows.collect::<rusqlite::Result<_>>()?;
        v.reverse();
        Ok(v)
    }

    /// Held-out loss of every evaluated version of a block: (version, time_ms, loss).
    pub fn version_losses(&self, block: usize) -> Result<Vec<(u64, u64, f64)>> {
        version_losses(&self.conn, block)
    }

    /// Whether a worker trains on its own data (its shard is not on the coordinator).
    pub fn has_own_data(&self, worker: &str) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT data_hash IS NOT NULL FROM workers WHERE key = ?1",
                [worker],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(false))
    }

    /// Notes that an update's decision is in the ledger as receipt `index`.
    pub fn mark_receipted(&self, update: i64, index: u64) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO receipted (update_id, receipt) VALUES (?1, ?2)",
            params![update, index as i64],
        )?;
        Ok(())
    }

    /// Decided updates (applied, or refused after authentication: their claim is on
    /// record) with no receipt yet: (id, base version, state, reason). A crash between a
    /// decision and its receipt leaves these; the coordinator issues them at start-up.
    #[allow(clippy::type_complexity)]
    pub fn unreceipted(&self) -> Result<Vec<(i64, Option<i64>, String, Option<String>)>> {
        let mut st = self.conn.prepare(
            "SELECT u.id, u.version, u.state, u.reason
             FROM updates u LEFT JOIN receipted r ON r.update_id = u.id
             WHERE r.update_id IS NULL AND u.state != 'pending'
               AND (u.state = 'applied' OR u.id IN (SELECT update_id FROM claims))
             ORDER BY u.id",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// An update's worker, lease and body hash.
    #[allow(clippy::type_complexity)]
    pub fn update_origin(&self, id: i64) -> Result<Option<(String, Option<i64>, Option<String>)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT worker, lease, hash FROM updates WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?)
    }

    /// Whether a worker failed a spot check.
    pub fn is_flagged(&self, worker: &str) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM flags WHERE worker = ?1",
                [worker],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Counts a failed check against a worker.
    pub fn flag_worker(&self, worker: &str, reason: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO flags (worker, failed_checks, last_reason) VALUES (?1, 1, ?2)
             ON CONFLICT(worker) DO UPDATE SET failed_checks = failed_checks + 1, last_reason = excluded.last_reason",
            params![worker, reason],
        )?;
        Ok(())
    }

    /// Workers with failed checks: (key, count, last reason).
    pub fn flagged(&self) -> Result<Vec<(String, i64, String)>> {
        let mut st = self
            .conn
            .prepare("SELECT worker, failed_checks, last_reason FROM flags ORDER BY worker")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// An accepted (pending or applied) update with this body hash, if any: its id and worker.
    pub fn accepted_with_hash(&self, hash: &str) -> Result<Option<(i64, String)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, worker FROM updates WHERE hash = ?1 AND state != 'rejected' LIMIT 1",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// A meta value.
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// Sets a meta value.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    // ---- blobs ----

    /// Path of a blob (it may not exist).
    pub fn blob_path(&self, hash: &str) -> PathBuf {
        self.blobs.join(format!("{hash}.safetensors"))
    }

    /// Stores bytes under their blake3; returns the hash.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String> {
        let hash = content_hash(bytes);
        let path = self.blob_path(&hash);
        if !path.exists() {
            write_atomic(&path, bytes)?;
        }
        Ok(hash)
    }

    /// Reads a blob and checks its hash.
    pub fn get_blob(&self, hash: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(hash);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        if content_hash(&bytes) != hash {
            return Err(NodeError::Config(format!(
                "{}: content does not match its name (disk corruption?)",
                path.display()
            )));
        }
        Ok(bytes)
    }

    /// Removes blobs (and temp files) no row refers to; returns how many.
    pub fn collect_garbage(&self) -> Result<usize> {
        let mut live: HashSet<String> = HashSet::new();
        for sql in [
            "SELECT weights FROM versions WHERE pruned = 0",
            "SELECT wire FROM versions WHERE pruned = 0",
            "SELECT momentum FROM versions WHERE momentum IS NOT NULL AND pruned = 0",
            "SELECT hash FROM updates WHERE state = 'pending' AND hash IS NOT NULL",
        ] {
            let mut st = self.conn.prepare(sql)?;
            for h in st.query_map([], |r| r.get::<_, String>(0))? {
                live.insert(h?);
            }
        }
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.blobs).map_err(io_err(&self.blobs))? {
            let path = entry.map_err(io_err(&self.blobs))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let hash = name.strip_suffix(".safetensors").unwrap_or("");
            if !live.contains(hash) {
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    // ---- blocks and versions ----

    /// Every block's head, by index.
    pub fn heads(&self) -> Result<Vec<BlockHead>> {
        let mut st = self.conn.prepare(
            "SELECT block, version, weights, wire, momentum, steps FROM blocks ORDER BY block",
        )?;
        let rows = st.query_map([], |r| {
            Ok(BlockHead {
                block: r.get::<_, i64>(0)? as usize,
                version: r.get::<_, i64>(1)? as u64,
                weights: r.get(2)?,
                wire: r.get(3)?,
                momentum: r.get(4)?,
                steps: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Commits a block's new head (version 0 creates it), applying `updates` and
    /// superseding the old round's open leases, in one transaction.
    pub fn commit_version(&mut self, head: &BlockHead, updates: &[i64], now: u64) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO blocks (block, version, weights, wire, momentum, steps) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(block) DO UPDATE SET version = excluded.version, weights = excluded.weights,
               wire = excluded.wire, momentum = excluded.momentum, steps = excluded.steps",
            params![head.block as i64, head.version as i64, head.weights, head.wire, head.momentum, head.steps],
        )?;
        tx.execute(
            "INSERT INTO versions (block, version, weights, wire, momentum, updates, steps, committed_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                head.block as i64,
                head.version as i64,
                head.weights,
                head.wire,
                head.momentum,
                updates.len() as i64,
                head.steps,
                now as i64
            ],
        )?;
        for id in updates {
            tx.execute("UPDATE updates SET state = 'applied' WHERE id = ?1", [id])?;
        }
        if head.version > 0 {
            tx.execute(
                "UPDATE leases SET state = 'superseded'
                 WHERE block = ?1 AND version = ?2 AND state = 'active'",
                params![head.block as i64, head.version as i64 - 1],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Version history of a block: (version, weights hash), oldest first.
    pub fn history(&self, block: usize) -> Result<Vec<(u64, String)>> {
        let mut st = self
            .conn
            .prepare("SELECT version, weights FROM versions WHERE block = ?1 ORDER BY version")?;
        let rows = st.query_map([block as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Whether `hash` is the weights of any committed version (what may be downloaded).
    pub fn is_checkpoint(&self, hash: &str) -> Result<Option<usize>> {
        Ok(self
            .conn
            .query_row(
                "SELECT block FROM versions WHERE (weights = ?1 OR wire = ?1) AND pruned = 0 LIMIT 1",
                [hash],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|b| b as usize))
    }

    // ---- workers ----

    /// Adds or refreshes a worker.
    pub fn upsert_worker(
        &self,
        key: &str,
        info: &blocktrain_protocol::wire::WorkerInfo,
        now: u64,
    ) -> Result<()> {
        let (dh, db) = match &info.data {
            Some(d) => (Some(d.blake3.clone()), Some(d.bytes as i64)),
            None => (None, None),
        };
        self.conn.execute(
            "INSERT INTO workers (key, registered_ms, last_seen_ms, device, memory_bytes, step_rate, data_hash, data_bytes)
             VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(key) DO UPDATE SET last_seen_ms = ?2, device = ?3, memory_bytes = ?4,
               step_rate = COALESCE(?5, step_rate), data_hash = ?6, data_bytes = ?7",
            params![key, now as i64, info.device, info.memory_bytes as i64, info.step_rate, dh, db],
        )?;
        Ok(())
    }

    /// A registered worker's last reported step rate and block; None if unknown.
    pub fn worker(&self, key: &str) -> Result<Option<(Option<f64>, Option<usize>)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT step_rate, last_block FROM workers WHERE key = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get::<_, Option<i64>>(1)?.map(|b| b as usize))),
            )
            .optional()?)
    }

    /// Records a worker's step rate and time of contact.
    pub fn touch_worker(&self, key: &str, step_rate: Option<f64>, now: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE workers SET last_seen_ms = ?2, step_rate = COALESCE(?3, step_rate) WHERE key = ?1",
            params![key, now as i64, step_rate],
        )?;
        Ok(())
    }

    /// Registered workers: (key, device, step rate, data hash, data bytes, last seen).
    #[allow(clippy::type_complexity)]
    pub fn workers(
        &self,
    ) -> Result<
        Vec<(
            String,
            String,
            Option<f64>,
            Option<String>,
            Option<i64>,
            u64,
        )>,
    > {
        let mut st = self.conn.prepare(
            "SELECT key, device, step_rate, data_hash, data_bytes, last_seen_ms FROM workers ORDER BY registered_ms",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get::<_, i64>(5)? as u64,
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ---- leases ----

    /// Inserts a lease and remembers the worker's block; returns its id.
    #[allow(clippy::too_many_arguments)]
    pub fn insert_lease(
        &self,
        worker: &str,
        block: usize,
        version: u64,
        slot: u32,
        steps: i64,
        seed: u64,
        now: u64,
        expires: u64,
        public: bool,
    ) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO leases (worker, block, version, slot, steps, seed, issued_ms, expires_ms, state, public)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'active', ?9)",
            params![worker, block as i64, version as i64, slot, steps, seed as i64, now as i64, expires as i64, public],
        )?;
        let id = self.conn.last_insert_rowid();
        self.conn.execute(
            "UPDATE workers SET last_block = ?2 WHERE key = ?1",
            params![worker, block as i64],
        )?;
        Ok(id)
    }

    /// Binds invite `token` (its hash) to `worker` if it is free; returns the other
    /// owner when it is taken.
    pub fn claim_invite(&self, token: &str, worker: &str) -> Result<Option<String>> {
        self.conn.execute(
            "INSERT OR IGNORE INTO invites (token, worker) VALUES (?1, ?2)",
            params![token, worker],
        )?;
        let owner: String = self.conn.query_row(
            "SELECT worker FROM invites WHERE token = ?1",
            [token],
            |r| r.get(0),
        )?;
        Ok((owner != worker).then_some(owner))
    }

    /// When `block` last moved: its head's commit or its latest accepted update.
    pub fn last_progress_ms(&self, block: usize) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT MAX(COALESCE((SELECT MAX(committed_ms) FROM versions WHERE block = ?1), 0),
                        COALESCE((SELECT MAX(received_ms) FROM updates WHERE block = ?1
                                  AND state != 'rejected'), 0))",
            [block as i64],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Whether any upload on `lease` was decided (accepted or refused): a lease gets one.
    pub fn lease_decided(&self, lease: i64) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM updates WHERE lease = ?1)",
            [lease],
            |r| r.get(0),
        )?)
    }

    /// Leases of a round's slot closed by a refusal or a failed spot check.
    pub fn refusals_in_slot(&self, block: usize, version: u64, slot: u32) -> Result<u32> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM leases WHERE block = ?1 AND version = ?2 AND slot = ?3
             AND state IN ('refused', 'void')",
            params![block as i64, version as i64, slot],
            |r| r.get(0),
        )?)
    }

    /// When a lease was issued.
    pub fn lease_issued_ms(&self, lease: i64) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT issued_ms FROM leases WHERE id = ?1", [lease], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    /// One lease.
    pub fn lease(&self, id: i64) -> Result<Option<LeaseRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, worker, block, version, slot, steps, seed, expires_ms, state, public FROM leases WHERE id = ?1",
                [id],
                |r| {
                    Ok(LeaseRow {
                        id: r.get(0)?,
                        worker: r.get(1)?,
                        block: r.get::<_, i64>(2)? as usize,
                        version: r.get::<_, i64>(3)? as u64,
                        slot: r.get(4)?,
                        steps: r.get(5)?,
                        seed: r.get::<_, i64>(6)? as u64,
                        expires_ms: r.get::<_, i64>(7)? as u64,
                        state: r.get(8)?,
                        public: r.get(9)?,
                    })
                },
            )
            .optional()?)
    }

    /// Sets a lease's state.
    pub fn set_lease_state(&self, id: i64, state: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE leases SET state = ?2 WHERE id = ?1",
            params![id, state],
        )?;
        Ok(())
    }

    /// Extends an active lease.
    pub fn renew_lease(&self, id: i64, expires: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE leases SET expires_ms = ?2 WHERE id = ?1 AND state = 'active'",
            params![id, expires as i64],
        )?;
        Ok(())
    }

    /// Marks active leases past their deadline, or held longer than `max_ms` in all,
    /// expired; returns how many.
    pub fn expire_leases(&self, now: u64, max_ms: u64) -> Result<usize> {
        Ok(self.conn.execute(
            "UPDATE leases SET state = 'expired'
             WHERE state = 'active' AND (expires_ms <= ?1 OR issued_ms + ?2 <= ?1)",
            params![now as i64, max_ms as i64],
        )?)
    }

    /// Gives every active lease until at least `until` (after a coordinator restart, so
    /// its downtime is not charged to the workers).
    pub fn extend_active_leases(&self, until: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE leases SET expires_ms = MAX(expires_ms, ?1) WHERE state = 'active'",
            [until as i64],
        )?;
        Ok(())
    }

    /// Shard slots held in a round by active leases or delivered updates.
    pub fn used_slots(&self, block: usize, version: u64) -> Result<Vec<u32>> {
        let mut st = self.conn.prepare(
            "SELECT slot FROM leases WHERE block = ?1 AND version = ?2 AND state IN ('active', 'delivered')",
        )?;
        let rows = st.query_map(params![block as i64, version as i64], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Active leases and leases issued so far for a block's round.
    pub fn round_leases(&self, block: usize, version: u64) -> Result<(u32, u32)> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(SUM(state = 'active'), 0), COUNT(*) FROM leases WHERE block = ?1 AND version = ?2",
            params![block as i64, version as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?)
    }

    /// The active lease `worker` holds, if any.
    pub fn active_lease_of(&self, worker: &str) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id FROM leases WHERE worker = ?1 AND state = 'active' ORDER BY id DESC LIMIT 1",
                [worker],
                |r| r.get(0),
            )
            .optional()?)
    }

    // ---- updates ----

    /// Records an update (accepted or rejected); returns its id.
    pub fn insert_update(&self, u: &NewUpdate, now: u64) -> Result<i64> {
        insert_update(&self.conn, u, u.state, now)
    }

    /// Accepts an update in one transaction: its row (pending), its lease delivered, its
    /// bytes counted. Returns the update id.
    pub fn accept_update(&mut self, u: &NewUpdate, now: u64) -> Result<i64> {
        let tx = self.conn.transaction()?;
        let id = insert_update(&tx, u, update_state::PENDING, now)?;
        tx.execute(
            "UPDATE leases SET state = 'delivered' WHERE id = ?1",
            [u.lease],
        )?;
        tx.execute(
            "INSERT INTO traffic (worker, block, up, down) VALUES (?1, ?2, ?3, 0)
             ON CONFLICT(worker, block) DO UPDATE SET up = up + ?3",
            params![u.worker, u.block.map(|b| b as i64), u.bytes as i64],
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// The accepted (pending or applied) update of a lease: (id, body hash).
    pub fn update_of_lease(&self, lease: i64) -> Result<Option<(i64, String)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, hash FROM updates WHERE lease = ?1 AND state != 'rejected'",
                [lease],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Marks a pending update rejected (its body could not be read at merge time).
    pub fn reject_pending(&self, id: i64, reason: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE updates SET state = 'rejected', reason = ?2 WHERE id = ?1 AND state = 'pending'",
            params![id, reason],
        )?;
        Ok(())
    }

    /// Removes the files of `block`'s versions older than `keep_from` (their rows stay,
    /// marked pruned); returns how many files went.
    pub fn prune_versions(&self, block: usize, keep_from: u64) -> Result<usize> {
        let mut st = self.conn.prepare(
            "SELECT weights, wire, momentum FROM versions WHERE block = ?1 AND version < ?2 AND pruned = 0",
        )?;
        let rows: Vec<(String, String, Option<String>)> = st
            .query_map(params![block as i64, keep_from as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        self.conn.execute(
            "UPDATE versions SET pruned = 1 WHERE block = ?1 AND version < ?2",
            params![block as i64, keep_from as i64],
        )?;
        let mut removed = 0;
        for (w, x, m) in rows {
            for h in [Some(w), Some(x), m].into_iter().flatten() {
                if !self.blob_referenced(&h)? && std::fs::remove_file(self.blob_path(&h)).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Whether any kept version or pending update still names blob `hash`.
    pub fn blob_referenced(&self, hash: &str) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM versions WHERE pruned = 0 AND (weights = ?1 OR wire = ?1 OR momentum = ?1))
                 OR EXISTS (SELECT 1 FROM updates WHERE hash = ?1 AND state = 'pending')",
            [hash],
            |r| r.get(0),
        )?)
    }

    /// Pending updates of a block's round, oldest first.
    pub fn pending(&self, block: usize, version: u64) -> Result<Vec<PendingUpdate>> {
        let mut st = self.conn.prepare(
            "SELECT id, hash, steps, received_ms FROM updates
             WHERE block = ?1 AND version = ?2 AND state = 'pending' ORDER BY id",
        )?;
        let rows = st.query_map(params![block as i64, version as i64], |r| {
            Ok(PendingUpdate {
                id: r.get(0)?,
                hash: r.get(1)?,
                steps: r.get(2)?,
                received_ms: r.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Most recent update records, newest first.
    pub fn recent_updates(&self, limit: usize) -> Result<Vec<UpdateRecord>> {
        let mut st = self.conn.prepare(
            "SELECT id, worker, block, version, bytes, state, reason, loss FROM updates ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = st.query_map([limit as i64], |r| {
            Ok(UpdateRecord {
                id: r.get(0)?,
                worker: r.get(1)?,
                block: r.get::<_, Option<i64>>(2)?.map(|b| b as usize),
                version: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                bytes: r.get::<_, i64>(4)? as u64,
                state: r.get(5)?,
                reason: r.get(6)?,
                loss: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Update counts by state.
    pub fn update_counts(&self) -> Result<Vec<(String, u64)>> {
        let mut st = self
            .conn
            .prepare("SELECT state, COUNT(*) FROM updates GROUP BY state ORDER BY state")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ---- traffic ----

    /// Adds bytes moved for a worker on a block.
    pub fn add_traffic(&self, worker: &str, block: usize, up: u64, down: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO traffic (worker, block, up, down) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(worker, block) DO UPDATE SET up = up + ?3, down = down + ?4",
            params![worker, block as i64, up as i64, down as i64],
        )?;
        Ok(())
    }

    /// All traffic rows.
    pub fn traffic(&self) -> Result<Vec<Traffic>> {
        let mut st = self
            .conn
            .prepare("SELECT worker, block, up, down FROM traffic ORDER BY worker, block")?;
        let rows = st.query_map([], |r| {
            Ok(Traffic {
                worker: r.get(0)?,
                block: r.get::<_, i64>(1)? as usize,
                up: r.get::<_, i64>(2)? as u64,
                down: r.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

fn insert_update(conn: &Connection, u: &NewUpdate, state: &str, now: u64) -> Result<i64> {
    conn.execute(
        "INSERT INTO updates (lease, worker, block, version, bytes, hash, steps, loss, state, reason, received_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            u.lease,
            u.worker,
            u.block.map(|b| b as i64),
            u.version.map(|v| v as i64),
            u.bytes as i64,
            u.hash,
            u.steps,
            u.loss,
            state,
            u.reason,
            now as i64
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Held-out loss of every evaluated version of a block, on any connection to the
/// database (the HTTP layer's reader uses its own).
pub fn version_losses(conn: &Connection, block: usize) -> Result<Vec<(u64, u64, f64)>> {
    let mut st = conn.prepare(
        "SELECT version, time_ms, heldout FROM version_loss WHERE block = ?1 ORDER BY version",
    )?;
    let rows = st.query_map([block as i64], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get::<_, i64>(1)? as u64,
            r.get(2)?,
        ))
    })?;
    Ok(rows.collect::<std::result::Result<_, _>>()?)
}
