//! Idle connections kept for the next call to the same server.
//!
//! A connection goes back after a call ended with a final answer read in full, so what
//! comes out is between frames, greeted and (if the caller has credentials)
//! authenticated: the next request on it pays no connect, greeting or `Hello`. Idle
//! connections are bounded per address and in addresses, and dropped well before the
//! server's idle timeout (half of what its greeting announced) so that the server
//! rarely closes one as it is reused; one found closed when taken out is dropped, and
//! a call whose reused connection dies before any reply byte retries once on a fresh
//! connection ([`super::call_stage`]).
//!
//! Idle connections are kept as `std` sockets, not tokio's: a tokio socket belongs to
//! the runtime that made it, and a pool may outlive one runtime and serve another.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blocktrain_protocol::frame::Greeting;

/// Bounds of a [`Pool`].
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Idle connections kept per address (more are closed).
    pub max_idle_per_addr: usize,
    /// Addresses with idle connections at once.
    pub max_addrs: usize,
    /// Longest an idle connection is kept (and at most half the server's idle timeout).
    pub idle_for: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_idle_per_addr: 8,
            max_addrs: 256,
            idle_for: Duration::from_secs(60),
        }
    }
}

struct Idle {
    stream: std::net::TcpStream,
    greeting: Greeting,
    expires: Instant,
}

/// Connections to servers, kept between calls; counts what it opened and reused.
pub struct Pool {
    settings: PoolSettings,
    idle: Mutex<HashMap<String, Vec<Idle>>>,
    opened: AtomicU64,
    reused: AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pool(opened {}, reused {})",
            self.opened(),
            self.reused()
        )
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new(PoolSettings::default())
    }
}

impl Pool {
    /// An empty pool.
    pub fn new(settings: PoolSettings) -> Pool {
        Pool {
            settings,
            idle: Mutex::new(HashMap::new()),
            opened: AtomicU64::new(0),
            reused: AtomicU64::new(0),
        }
    }

    /// Connections opened by calls that used this pool.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Calls served by a connection taken from the pool.
    pub fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    /// Idle connections held now.
    pub fn idle(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    pub(super) fn count_opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently returned live connection for `key`, if any.
    pub(super) fn take(&self, key: &str) -> Option<(std::net::TcpStream, Greeting)> {
        let mut idle = self.lock();
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        let found = loop {
            let Some(c) = list.pop() else { break None };
            if c.expires > now && alive(&c.stream) {
                break Some((c.stream, c.greeting));
            }
        };
        if list.is_empty() {
            idle.remove(key);
        }
        if found.is_some() {
            self.reused.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Keeps a connection that is between frames (else it is closed).
    pub(super) fn put(&self, key: &str, stream: std::net::TcpStream, greeting: Greeting) {
        let server_idle = Duration::from_millis(greeting.idle_timeout_ms / 2);
        let expires = Instant::now() + self.settings.idle_for.min(server_idle);
        let mut idle = self.lock();
        let now = Instant::now();
        if !idle.contains_key(key) && idle.len() >= self.settings.max_addrs {
            idle.retain(|_, l| {
                l.retain(|c| c.expires > now);
                !l.is_empty()
            });
            if idle.len() >= self.settings.max_addrs {
                return; // full of live connections to other servers: close this one
            }
        }
        let list = idle.entry(key.to_string()).or_default();
        list.retain(|c| c.expires > now);
        if list.len() >= self.settings.max_idle_per_addr {
            list.remove(0); // the oldest goes
        }
        list.push(Idle {
            stream,
            greeting,
            expires,
        });
    }
}

/// Whether an idle connection is still open: nothing to read yet (a closed one reads
/// EOF, and a server sends nothing unasked between requests).
fn alive(s: &std::net::TcpStream) -> bool {
    matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}
