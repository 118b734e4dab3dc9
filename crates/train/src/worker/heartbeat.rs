//! A lease's heartbeat: renews the lease from a background thread while the worker
//! downloads, trains and uploads, and notices when the coordinator no longer wants it.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blocktrain_protocol::wire::{HeartbeatReply, Lease};

use crate::client::Client;

/// Keeps a lease alive from a background thread while it is held (download, training,
/// upload); `wanted()` turns false once the coordinator says the round moved on.
pub(super) struct Heartbeat {
    stop: Arc<AtomicBool>,
    wanted: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    pub(super) fn start(mut client: Client, lease: &Lease) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let wanted = Arc::new(AtomicBool::new(true));
        let every = Duration::from_millis(lease.lease_ms / 3).max(Duration::from_millis(100));
        let path = format!("/v1/leases/{}/heartbeat", lease.id);
        let (s, w) = (stop.clone(), wanted.clone());
        let thread = std::thread::spawn(move || {
            let mut last = Instant::now();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if last.elapsed() < every {
                    continue;
                }
                last = Instant::now();
                match client.post_empty::<HeartbeatReply>(&path) {
                    Ok(r) if !r.still_wanted => {
                        w.store(false, Ordering::Relaxed);
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("heartbeat failed ({e}); the lease may lapse"),
                }
            }
        });
        Heartbeat {
            stop,
            wanted,
            thread: Some(thread),
        }
    }

    pub(super) fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Relaxed)
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
