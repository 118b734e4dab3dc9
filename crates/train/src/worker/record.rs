//! What a worker keeps on disk about its coordinator, one directory per worker key,
//! `CACHE/<first 16 hex digits of the worker's public key>/`:
//!
//! - `*.safetensors`: downloaded checkpoints ([`crate::client::Client::checkpoint`]);
//! - `coordinator.pub`: the coordinator's public key as first seen. It is pinned: a
//!   coordinator's key never changes, so another key means another (or a replaced)
//!   coordinator, and the worker refuses to go on rather than start a new record;
//! - `max-staleness`: the run's `max_staleness` K as first announced, pinned like the
//!   key: the audit holds every receipt of this worker's to it, so a coordinator that
//!   merged an update more than K versions stale, or announces another K later, is
//!   caught rather than believed;
//! - `ledger-head.json`: the newest tree head this worker checked; the next audit proves
//!   the log extends it;
//! - `uploads.jsonl`: one JSON line per upload the coordinator answered (append-only), so
//!   the audit can name uploads the ledger holds no receipt for.
//!
//! Per key because this is one worker's record: two keys sharing a directory would
//! otherwise check one worker's ledger against the other's head and uploads.
use std::io::Write;
use std::path::{Path, PathBuf};

use blocktrain_protocol::receipt::TreeHead;
use serde::{Deserialize, Serialize};

use crate::{io_err, NodeError, Result};

/// Hex digits of the worker's key that name its directory (64 bits: two keys collide
/// only by accident at odds of 2^-64, never by choice of the coordinator).
pub const KEY_TAG_LEN: usize = 16;

/// The directory under `root` that holds the record of the worker with public key
/// `worker_key` (hex).
pub fn key_dir(root: &Path, worker_key: &str) -> PathBuf {
    root.join(worker_key.chars().take(KEY_TAG_LEN).collect::<String>())
}

/// One upload the coordinator answered, as this worker saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    /// The lease it answered.
    pub lease: i64,
    /// Block, 0-based.
    pub block: u32,
    /// The block version it was trained from.
    pub base_version: u64,
    /// blake3 (hex) of the body sent, which its receipt's claim names.
    pub update_blake3: String,
    /// The coordinator's id for it (accepted uploads).
    pub update_id: Option<i64>,
    /// Taken into its round: the receipt comes when the round closes. False: refused,
    /// and the coordinator issues the receipt with the refusal.
    pub accepted: bool,
    /// The block's version in the coordinator's reply (accepted uploads).
    pub block_version: Option<u64>,
    /// Why it was refused.
    pub reason: Option<String>,
    /// When the reply came, Unix ms.
    pub time_ms: u64,
}

/// A worker's record in its key's directory.
#[derive(Clone, Debug)]
pub struct Record {
    dir: PathBuf,
}

impl Record {
    /// The record of `worker_key` under `root`, created if absent.
    pub fn open(root: &Path, worker_key: &str) -> Result<Record> {
        if worker_key.len() < KEY_TAG_LEN || !worker_key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NodeError::Config(format!(
                "worker key {worker_key:?} is not hex"
            )));
        }
        let dir = key_dir(root, worker_key);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Record { dir })
    }

    /// The directory: this worker's checkpoint cache as well.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn pin_path(&self) -> PathBuf {
        self.dir.join("coordinator.pub")
    }

    /// The pinned coordinator key, if one was seen.
    pub fn pinned(&self) -> Result<Option<String>> {
        let path = self.pin_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Pins `coordinator` (a verified public key, hex) on first contact; afterwards
    /// refuses any other key, naming both and the file that holds the pin.
    pub fn pin(&self, coordinator: &str, url: &str) -> Result<()> {
        match self.pinned()? {
            Some(old) if old.eq_ignore_ascii_case(coordinator) => Ok(()),
            Some(old) => Err(NodeError::Rejected(format!(
                "the coordinator at {url} signs with key {coordinator}, but this worker first \
                 met its coordinator with key {old} (pinned in {}). A coordinator's key does \
                 not change: this is another or a replaced coordinator, and this worker's \
                 record with the first one would silently restart. Refusing to continue; to \
                 join another run with this worker key on purpose, give it another --cache",
                self.pin_path().display()
            ))),
            None => {
                let path = self.pin_path();
                let text = format!("{}\n", coordinator.to_ascii_lowercase());
                blocktrain_model::checkpoint::write_atomic(&path, text.as_bytes())?;
                Ok(())
            }
        }
    }

    fn staleness_path(&self) -> PathBuf {
        self.dir.join("max-staleness")
    }

    /// Pins the run's `max_staleness` `k` on first contact and returns it; afterwards
    /// refuses any other value, naming both and the file that holds the pin.
    pub fn pin_staleness(&self, k: u64, url: &str) -> Result<u64> {
        let path = self.staleness_path();
        let old = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|e| {
                NodeError::Config(format!(
                    "{}: not a version count ({e}); it is this worker's own file, so \
                     something else wrote it: move it away to start a new record",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                blocktrain_model::checkpoint::write_atomic(&path, format!("{k}\n").as_bytes())?;
                return Ok(k);
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        match old == k {
            true => Ok(k),
            false => Err(NodeError::Rejected(format!(
                "ledger audit failed: the coordinator at {url} announces max_staleness {k}, \
                 but announced {old} when this worker first met it (pinned in {}). The rule \
                 that decides which base an update may be merged into does not change \
                 within a run; refusing to continue",
                path.display()
            ))),
        }
    }

    fn head_path(&self) -> PathBuf {
        self.dir.join("ledger-head.json")
    }

    /// The tree head the last audit kept (None: no audit passed yet).
    pub fn kept_head(&self) -> Result<Option<TreeHead>> {
        let path = self.head_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                NodeError::Config(format!(
                    "{}: not a tree head ({e}); it is this worker's own file, so something \
                     else wrote it: move it away to start a new record",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Keeps `head` for the next audit.
    pub fn keep_head(&self, head: &TreeHead) -> Result<()> {
        let json = serde_json::to_vec(head).expect("heads serialise");
        Ok(blocktrain_model::checkpoint::write_atomic(
            &self.head_path(),
            &json,
        )?)
    }

    fn uploads_path(&self) -> PathBuf {
        self.dir.join("uploads.jsonl")
    }

    /// Appends `upload` to the journal (synced: the audit relies on it).
    pub fn record(&self, upload: &Upload) -> Result<()> {
        let path = self.uploads_path();
        let mut line = serde_json::to_vec(upload).expect("uploads serialise");
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.write_all(&line).map_err(io_err(&path))?;
        f.sync_data().map_err(io_err(&path))
    }

    /// Every upload in the journal, oldest first. A line that does not parse (the tail
    /// of a write cut short by a crash) is skipped with a warning.
    pub fn uploads(&self) -> Result<Vec<Upload>> {
        let path = self.uploads_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut out = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            match serde_json::from_str(line) {
                Ok(u) => out.push(u),
                Err(e) => eprintln!(
                    "{}:{}: skipping an unreadable upload record ({e})",
                    path.display(),
                    n + 1
                ),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(lease: i64) -> Upload {
        Upload {
            lease,
            block: 0,
            base_version: 1,
            update_blake3: "ab".repeat(32),
            update_id: Some(lease),
            accepted: true,
            block_version: Some(1),
            reason: None,
            time_ms: 5,
        }
    }

    #[test]
    fn each_key_keeps_its_own_pin_and_journal() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = ("0a".repeat(32), "0b".repeat(32));
        let ra = Record::open(root.path(), &a).unwrap();
        let rb = Record::open(root.path(), &b).unwrap();
        assert_ne!(ra.dir(), rb.dir());
        assert!(ra.dir().starts_with(root.path()));
        ra.record(&upload(1)).unwrap();
        ra.record(&upload(2)).unwrap();
        assert_eq!(ra.uploads().unwrap(), vec![upload(1), upload(2)]);
        assert!(rb.uploads().unwrap().is_empty());

        let (k1, k2) = ("c1".repeat(32), "c2".repeat(32));
        ra.pin(&k1, "http://x").unwrap();
        ra.pin(&k1.to_uppercase(), "http://x").unwrap();
        let e = ra.pin(&k2, "http://x").unwrap_err().to_string();
        assert!(e.contains(&k1) && e.contains(&k2), "{e}");
        rb.pin(&k2, "http://y").unwrap();
        assert_eq!(ra.pinned().unwrap(), Some(k1));

        // A record cut short by a crash loses only its own line.
        let journal = ra.dir().join("uploads.jsonl");
        let mut text = std::fs::read_to_string(&journal).unwrap();
        text.push_str("{\"lease\": 3, \"blo");
        std::fs::write(&journal, text).unwrap();
        assert_eq!(ra.uploads().unwrap().len(), 2);
        assert!(Record::open(root.path(), "../../etc").is_err());
    }
}
