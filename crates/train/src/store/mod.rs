//! The coordinator's durable state: one SQLite database (WAL, synchronous=FULL) for
//! runs, workers, leases, rounds and updates, and a directory of content-addressed
//! blobs (`blobs/<blake3>.safetensors`) for checkpoints, momentum buffers and pending
//! updates.
//!
//! Crash safety: a blob is written (temp file, fsync, rename) before any row names it,
//! and every state change that spans rows (accepting an update, committing a version) is
//! one transaction, so after `kill -9` the database names only complete blobs and an
//! update is either wholly accepted or absent. Blobs no row names are removed at startup.
//!
//! Stale updates (`[training] max_staleness` K) keep to the same rules: an update row
//! holds its base `version` and its `staleness` k (the round it joined is version + k,
//! written in the accepting transaction), a commit supersedes only the active leases
//! more than K versions behind the new version, and the rebuild reads the leases, the
//! decisions and the wire copies of the K versions before each block's current one
//! (their files are kept: `keep_versions` > K), so a restart finds the same open stale
//! leases and pending stale updates.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use blocktrain_model::checkpoint::{content_hash, write_atomic};
use rusqlite::{params, Connection, OptionalExtension};

use crate::{io_err, NodeError, Result};

mod leases;
mod trust;
mod updates;

pub use trust::version_losses;

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
    state TEXT NOT NULL, reason TEXT, received_ms INTEGER NOT NULL,
    staleness INTEGER NOT NULL DEFAULT 0);
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

pub use crate::core::{lease_state, LeaseRow};

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
    /// Versions between its base and the round it joined (0: fresh).
    #[serde(default)]
    pub staleness: u64,
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
    /// Accepted k versions after its base (it joins round `version + staleness`).
    pub staleness: u64,
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

/// The content-addressed blob directory: files are written before any row names them,
/// so work off the coordinator's lock may write here (a blob no row names is removed at
/// the next start).
#[derive(Clone, Debug)]
pub struct Blobs(PathBuf);

impl Blobs {
    /// Path of a blob (it may not exist).
    pub fn path(&self, hash: &str) -> PathBuf {
        self.0.join(format!("{hash}.safetensors"))
    }

    /// Stores bytes under their blake3 (temp file, fsync, rename); returns the hash.
    pub fn put(&self, bytes: &[u8]) -> Result<String> {
        let hash = content_hash(bytes);
        let path = self.path(&hash);
        if !path.exists() {
            write_atomic(&path, bytes)?;
        }
        Ok(hash)
    }

    /// Reads a blob and checks its hash.
    pub fn get(&self, hash: &str) -> Result<Vec<u8>> {
        let path = self.path(hash);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        if content_hash(&bytes) != hash {
            return Err(NodeError::Config(format!(
                "{}: content does not match its name (disk corruption?)",
                path.display()
            )));
        }
        Ok(bytes)
    }
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
        // Databases from before stale updates: every update joined its own base's round.
        let has_staleness: bool = store.conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('updates') WHERE name = 'staleness'",
            [],
            |r| r.get(0),
        )?;
        if !has_staleness {
            store.conn.execute_batch(
                "ALTER TABLE updates ADD COLUMN staleness INTEGER NOT NULL DEFAULT 0",
            )?;
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

    /// Path of a blob (it may not exist).
    pub fn blob_path(&self, hash: &str) -> PathBuf {
        Blobs(self.blobs.clone()).path(hash)
    }

    /// Stores bytes under their blake3; returns the hash.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String> {
        Blobs(self.blobs.clone()).put(bytes)
    }

    /// Reads a blob and checks its hash.
    pub fn get_blob(&self, hash: &str) -> Result<Vec<u8>> {
        Blobs(self.blobs.clone()).get(hash)
    }

    /// The blob directory, for work done without the store (a merge off the lock).
    pub fn blobs(&self) -> Blobs {
        Blobs(self.blobs.clone())
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
    /// superseding the active leases more than `max_staleness` versions behind it (the
    /// old round's, with 0), in one transaction.
    pub fn commit_version(
        &mut self,
        head: &BlockHead,
        updates: &[i64],
        max_staleness: u64,
        now: u64,
    ) -> Result<()> {
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
        if head.version > max_staleness {
            // Only the version that just left the window can hold active leases: each
            // commit supersedes the one before it (with K = 0, the old round's).
            tx.execute(
                "UPDATE leases SET state = 'superseded'
                 WHERE block = ?1 AND version <= ?2 AND state = 'active'",
                params![head.block as i64, (head.version - 1 - max_staleness) as i64],
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
}
