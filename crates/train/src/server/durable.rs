//! Group commit: requests' writes are made durable together, off the coordinator's lock.
//!
//! While serving, the database runs with `synchronous=NORMAL` in WAL mode: a commit
//! writes its pages to the WAL file without waiting for the disk. A request that wrote
//! takes a ticket after its commit and waits for a flush; one flusher thread fsyncs the
//! WAL for every ticket taken so far at once. So a reply still means "on disk" (as with
//! an fsync per commit), but one fsync serves every request that arrived during the
//! previous one, and none of them holds the lock while it waits.
//!
//! SQLite itself fsyncs the WAL before a checkpoint copies it into the database, so
//! checkpoints lose nothing; a process crash loses nothing either (the WAL's pages are in
//! the OS's cache); only a power loss could take commits whose flush had not finished:
//! no reply that wrote them had been sent, though a public read (the status snapshot,
//! a ledger page) may have shown them for up to one tick.
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};

use crate::NodeError;

/// The flusher's bookkeeping: tickets handed out and tickets flushed.
#[derive(Debug, Default)]
struct Tickets {
    taken: u64,
    flushed: u64,
    failed: Option<String>,
}

/// One WAL file's group commit.
#[derive(Debug)]
pub struct GroupCommit {
    wal: PathBuf,
    tickets: Mutex<Tickets>,
    work: Condvar,
    done: tokio::sync::watch::Sender<u64>,
}

impl GroupCommit {
    /// Starts the flusher thread for the WAL at `wal`.
    pub fn start(wal: PathBuf) -> std::sync::Arc<Self> {
        let (done, _) = tokio::sync::watch::channel(0);
        let gc = std::sync::Arc::new(GroupCommit {
            wal,
            tickets: Mutex::new(Tickets::default()),
            work: Condvar::new(),
            done,
        });
        let flusher = std::sync::Arc::downgrade(&gc);
        std::thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || flush_loop(flusher))
            .expect("the flusher thread starts");
        gc
    }

    /// Waits until everything committed before this call is on disk.
    pub async fn synced(&self) -> Result<(), NodeError> {
        let ticket = {
            let mut t = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
            t.taken += 1;
            t.taken
        };
        self.work.notify_one();
        let mut rx = self.done.subscribe();
        rx.wait_for(|&flushed| flushed >= ticket)
            .await
            .map_err(|_| NodeError::Network("the flusher stopped".into()))?;
        let t = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        match &t.failed {
            Some(e) => Err(NodeError::Network(format!(
                "state not flushed to disk: {e}"
            ))),
            None => Ok(()),
        }
    }

    /// Whether a flush ever failed (then no write is acknowledged as done again).
    #[cfg(test)]
    pub fn failed(&self) -> bool {
        self.tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed
            .is_some()
    }

    /// Flushes made so far (each covering every ticket taken before it began).
    pub fn flushed(&self) -> u64 {
        *self.done.borrow()
    }
}

/// Waits for tickets, fsyncs the WAL once for all of them, and reports. Ends when the
/// last handle on the group commit is gone.
fn flush_loop(gc: std::sync::Weak<GroupCommit>) {
    let mut file: Option<File> = None;
    loop {
        let Some(gc) = gc.upgrade() else { return };
        let target = {
            let mut t = gc.tickets.lock().unwrap_or_else(|p| p.into_inner());
            while t.taken == t.flushed {
                let (guard, timeout) = gc
                    .work
                    .wait_timeout(t, std::time::Duration::from_millis(200))
                    .unwrap_or_else(|p| p.into_inner());
                t = guard;
                if timeout.timed_out() && t.taken == t.flushed {
                    break;
                }
            }
            t.taken
        };
        if target == gc.flushed() {
            continue; // idle: look again whether anyone still holds the group commit
        }
        // The WAL may not exist yet, or be recreated after the last reader closed it.
        let result = match file.as_ref() {
            Some(f) => f.sync_data(),
            None => File::open(&gc.wal).and_then(|f| {
                let r = f.sync_data();
                file = Some(f);
                r
            }),
        };
        let mut t = gc.tickets.lock().unwrap_or_else(|p| p.into_inner());
        // A failed fsync is permanent: the kernel may have dropped the dirty pages, and
        // a later fsync that succeeds proves nothing about them. Every waiter from then
        // on is told its state is not on disk; the operator restarts the coordinator.
        if let Err(e) = result {
            tracing::error!(
                "fsync of {} failed: {e}; no write is acknowledged from now on: restart the coordinator",
                gc.wal.display()
            );
            t.failed.get_or_insert(e.to_string());
            file = None;
        }
        t.flushed = target;
        drop(t);
        gc.done.send_replace(target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_concurrent_waiter_is_answered_after_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("x-wal");
        std::fs::write(&wal, b"pages").unwrap();
        let gc = GroupCommit::start(wal);
        let waits: Vec<_> = (0..64)
            .map(|_| {
                let gc = gc.clone();
                tokio::spawn(async move { gc.synced().await })
            })
            .collect();
        for w in waits {
            w.await.unwrap().unwrap();
        }
        // Every waiter was answered, and the flushes covered every ticket taken.
        assert_eq!(gc.flushed(), 64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_wal_is_an_error_not_a_silent_success() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("absent-wal");
        let gc = GroupCommit::start(wal.clone());
        let e = gc.synced().await.unwrap_err();
        assert!(e.to_string().contains("not flushed"), "{e}");
        // A failure is permanent: a later fsync that works proves nothing about the
        // pages the failed one may have lost.
        std::fs::write(&wal, b"pages").unwrap();
        assert!(gc.synced().await.is_err());
        assert!(gc.failed());
    }
}
