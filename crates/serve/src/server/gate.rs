//! What a server admits: connections (in all and per client address), the request rate
//! of each client, the bytes of the frames it holds, and requests computing or queued
//! with their compute budget. Each refusal names the limit and the flag that sets it.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blocktrain_protocol::frame::ErrorCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::budget::ByteBudget;

/// A server's capacity limits.
#[derive(Clone, Debug)]
pub struct Caps {
    /// Open TCP connections in all.
    pub max_connections: usize,
    /// Open TCP connections from one client IP address.
    pub max_connections_per_ip: usize,
    /// Requests computing or waiting for the compute (one computes at a time).
    pub max_inflight: usize,
    /// Largest tokens x steps_per_block of one diffusion request (per block hosted).
    pub max_token_steps: u64,
    /// Requests per second per client (its key when authenticated, else its IP); 0: no
    /// limit. Diffusion requests and AR sessions count, not the steps of a session.
    pub rate: f64,
    /// Requests a client may make at once before its rate applies.
    pub burst: f64,
    /// Clients whose rate is tracked at once (more are refused as busy).
    pub max_clients: usize,
    /// Bytes of frames (over [`UNCOUNTED_FRAME`](crate::budget::UNCOUNTED_FRAME)) that
    /// all connections together may hold at once, from the header's declared size until
    /// the request is done; answers from the next stage count too, until relayed.
    pub max_buffered: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            max_connections: 1024,
            max_connections_per_ip: 128,
            max_inflight: 64,
            max_token_steps: 1 << 22,
            rate: 100.0,
            burst: 200.0,
            max_clients: 10_000,
            max_buffered: 1 << 30,
        }
    }
}

/// A refusal: the code and a message naming the limit.
pub(super) type Refusal = (ErrorCode, String);

pub(super) struct Gate {
    caps: Caps,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    rates: Mutex<HashMap<String, Bucket>>,
    inflight: Arc<Semaphore>,
    /// [`Caps::max_buffered`], shared with the server's calls downstream.
    buffered: ByteBudget,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Holds one admitted connection's place; dropping it frees the place.
pub(super) struct ConnSlot {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.gate.open.fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = self.gate.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl Gate {
    pub(super) fn new(caps: Caps) -> Gate {
        Gate {
            inflight: Arc::new(Semaphore::new(caps.max_inflight.max(1))),
            buffered: ByteBudget::new(caps.max_buffered),
            caps,
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            rates: Mutex::new(HashMap::new()),
        }
    }

    /// A place for a new connection from `ip`, or why not.
    pub(super) fn connect(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refusal> {
        let busy = |m: String| (ErrorCode::Busy, m);
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if self.open.load(Ordering::Relaxed) >= self.caps.max_connections {
            return Err(busy(format!(
                "connection limit: {} connections open (--max-connections)",
                self.caps.max_connections
            )));
        }
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.caps.max_connections_per_ip {
            return Err(busy(format!(
                "per-address connection limit: {} connections open from {ip} (--max-connections-per-ip)",
                self.caps.max_connections_per_ip
            )));
        }
        *n += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(ConnSlot {
            gate: self.clone(),
            ip,
        })
    }

    /// Takes one request from `client`'s token bucket.
    pub(super) fn rate(&self, client: &str) -> Result<(), Refusal> {
        let (rate, burst) = (self.caps.rate, self.caps.burst.max(1.0));
        if rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        if !rates.contains_key(client) && rates.len() >= self.caps.max_clients {
            // A bucket that has refilled is the same as no bucket: forget those.
            let full_after = burst / rate;
            rates.retain(|_, b| now.duration_since(b.at).as_secs_f64() < full_after);
            if rates.len() >= self.caps.max_clients {
                return Err((
                    ErrorCode::Busy,
                    format!(
                        "client limit: {} clients making requests (try again shortly)",
                        self.caps.max_clients
                    ),
                ));
            }
        }
        let b = rates.entry(client.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens < 1.0 {
            return Err((
                ErrorCode::Busy,
                format!("rate limit: more than {rate} requests/s from this client (--rate)"),
            ));
        }
        b.tokens -= 1.0;
        Ok(())
    }

    /// The byte budget ([`Caps::max_buffered`]): frames read from upstream take from it
    /// ([`ByteBudget::reserve`], refused at once when they do not fit, their payload then
    /// discarded unread into memory), and so do answers from the next stage.
    pub(super) fn budget(&self) -> &ByteBudget {
        &self.buffered
    }

    /// Admits a request for compute: within the budget (`work` = tokens x steps, if a
    /// diffusion request) and with a place among the requests computing or queued.
    pub(super) fn admit(&self, work: Option<u64>) -> Result<OwnedSemaphorePermit, Refusal> {
        if let Some(w) = work.filter(|&w| w > self.caps.max_token_steps) {
            return Err((
                ErrorCode::LimitExceeded,
                format!(
                    "compute budget: {w} tokens x steps exceeds this server's {} per request (--max-token-steps)",
                    self.caps.max_token_steps
                ),
            ));
        }
        self.inflight.clone().try_acquire_owned().map_err(|_| {
            (
                ErrorCode::Busy,
                format!(
                    "request limit: {} requests computing or queued (--max-inflight)",
                    self.caps.max_inflight
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::UNCOUNTED_FRAME;

    #[test]
    fn each_cap_refuses_with_its_name_and_frees_its_place() {
        let gate = Arc::new(Gate::new(Caps {
            max_connections: 3,
            max_connections_per_ip: 2,
            max_inflight: 1,
            max_token_steps: 100,
            rate: 1.0,
            burst: 2.0,
            max_clients: 2,
            max_buffered: 3 * UNCOUNTED_FRAME + 1,
        }));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = gate.connect(a).unwrap();
        let _a2 = gate.connect(a).unwrap();
        let e = gate.connect(a).err().unwrap();
        assert!(e.1.contains("--max-connections-per-ip"), "{e:?}");
        let _b1 = gate.connect(b).unwrap();
        let e = gate.connect(b).err().unwrap();
        assert!(e.1.contains("--max-connections)"), "{e:?}");
        drop(a1);
        let _b2 = gate.connect(b).unwrap();

        assert!(gate.rate("k").is_ok() && gate.rate("k").is_ok());
        let e = gate.rate("k").unwrap_err();
        assert!(e.1.contains("--rate") && e.0 == ErrorCode::Busy, "{e:?}");
        assert!(gate.rate("other").is_ok());
        let e = gate.rate("third").unwrap_err();
        assert!(e.1.contains("client limit"), "{e:?}");

        let e = gate.admit(Some(101)).unwrap_err();
        assert_eq!(e.0, ErrorCode::LimitExceeded);
        assert!(e.1.contains("--max-token-steps"), "{e:?}");
        let held = gate.admit(Some(100)).unwrap();
        let e = gate.admit(None).unwrap_err();
        assert!(e.1.contains("--max-inflight"), "{e:?}");
        drop(held);
        assert!(gate.admit(None).is_ok());

        // Small frames are not counted; large ones share the byte budget until dropped.
        let big = 2 * UNCOUNTED_FRAME;
        assert!(gate.budget().reserve(UNCOUNTED_FRAME).unwrap().is_none());
        let held = gate.budget().reserve(big).unwrap().expect("counted");
        let e = gate.budget().reserve(big).unwrap_err();
        assert!(
            e.contains("--max-buffered-mb") && e.contains("held by frames"),
            "{e}"
        );
        assert!(
            gate.budget().reserve(UNCOUNTED_FRAME + 1).is_ok(),
            "what is left still fits"
        );
        let e = gate.budget().reserve(4 * UNCOUNTED_FRAME).unwrap_err();
        assert!(e.contains("exceeds"), "{e}");
        drop(held);
        assert!(gate.budget().reserve(big).is_ok());
    }
}
