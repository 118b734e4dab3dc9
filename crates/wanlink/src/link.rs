//! The proxy: accepts TCP clients on `listen`, connects each to `upstream`, and carries
//! bytes both ways through an emulated link (see the crate docs for the model).
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep_until, Instant};

use crate::LinkSpec;

/// Idle credit of the token bucket (like `tbf`'s burst): after a pause, up to this much
/// serialisation time is skipped. Also absorbs the timer's 1 ms granularity.
const BURST: Duration = Duration::from_millis(4);
/// tokio's timer fires on the first 1 ms tick at or after a deadline; aiming a bit early
/// keeps the error within about -0.25..+0.75 ms per trip instead of 0..+1 ms (and more).
const TIMER_SLACK: Duration = Duration::from_micros(250);
/// Largest chunk read (and delivered) at once.
const MAX_CHUNK: usize = 64 * 1024;
/// Smallest chunk cap, however slow the link.
const MIN_CHUNK: usize = 1500;

/// Byte counters shared by all connections of one link.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) up: AtomicU64,
    pub(crate) down: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) cut: AtomicU64,
}

/// Connection loss: the closest a TCP proxy comes to packet loss (it cannot drop packets;
/// TCP would retransmit them anyway). Each connection is, with probability `fraction`,
/// cut (both sockets closed) at a uniformly drawn moment within `within` of opening, as
/// a peer sees a link that drops out. Seeded, so a schedule replays.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cuts {
    /// Fraction of connections cut, 0..=1.
    pub fraction: f64,
    /// A cut comes at most this long after the connection opened.
    pub within: Duration,
    /// Seeds which connections are cut and when.
    pub seed: u64,
}

/// A running link; dropping it (or [`LinkHandle::shutdown`]) closes the listener and every
/// connection through it.
#[derive(Debug)]
pub struct LinkHandle {
    local_addr: SocketAddr,
    upstream: SocketAddr,
    spec: LinkSpec,
    counters: Arc<Counters>,
    task: Option<JoinHandle<()>>,
}

impl LinkHandle {
    /// Where clients connect (useful when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
    /// Where the link forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }
    /// The emulated link.
    pub fn spec(&self) -> LinkSpec {
        self.spec
    }
    /// Bytes delivered client → upstream so far, over all connections.
    pub fn bytes_up(&self) -> u64 {
        self.counters.up.load(Ordering::Relaxed)
    }
    /// Bytes delivered upstream → client so far, over all connections.
    pub fn bytes_down(&self) -> u64 {
        self.counters.down.load(Ordering::Relaxed)
    }
    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.counters.connections.load(Ordering::Relaxed)
    }
    pub(crate) fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
    /// Stops accepting, closes all connections, and returns once the port is released.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for LinkHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Listens on `listen` and forwards every accepted connection to `upstream` through a link
/// with `spec` in each direction. Must be called inside a tokio runtime.
pub async fn spawn_link(
    listen: SocketAddr,
    upstream: SocketAddr,
    spec: LinkSpec,
) -> anyhow::Result<LinkHandle> {
    spawn_link_with_cuts(listen, upstream, spec, None).await
}

/// [`spawn_link`] that also cuts connections ([`Cuts`]).
pub async fn spawn_link_with_cuts(
    listen: SocketAddr,
    upstream: SocketAddr,
    spec: LinkSpec,
    cuts: Option<Cuts>,
) -> anyhow::Result<LinkHandle> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("link: cannot listen on {listen}"))?;
    let local_addr = listener.local_addr()?;
    let counters = Arc::new(Counters::default());
    let task = tokio::spawn(accept_loop(
        listener,
        upstream,
        spec,
        cuts,
        counters.clone(),
    ));
    Ok(LinkHandle {
        local_addr,
        upstream,
        spec,
        counters,
        task: Some(task),
    })
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    spec: LinkSpec,
    cuts: Option<Cuts>,
    counters: Arc<Counters>,
) {
    // Aborting this task drops the set, which aborts every connection.
    let mut conns = JoinSet::new();
    // splitmix64: a seeded stream of cut decisions without another dependency.
    let mut state = cuts.map_or(0, |c| c.seed);
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    counters.connections.fetch_add(1, Ordering::Relaxed);
                    let cut_after = cuts
                        .filter(|c| next() < c.fraction)
                        .map(|c| c.within.mul_f64(next()));
                    conns.spawn(connection(client, upstream, spec, cut_after, counters.clone()));
                }
                Err(e) => {
                    // E.g. out of file descriptors: transient, keep serving.
                    eprintln!("wanlink: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    spec: LinkSpec,
    cut_after: Option<Duration>,
    c: Arc<Counters>,
) {
    // The TCP handshake: on a real link connect() returns after one round trip (SYN out,
    // SYN-ACK back) and the first data rides with the ACK. Here the kernel completed the
    // client's connect at once, so its first bytes wait in the socket for that round trip
    // instead; only then does the proxy open the upstream leg and carry data. A fresh
    // connection's first request/response thus costs 2 RTT, a pooled one's 1 RTT.
    let handshake = 2 * spec.delay();
    if !handshake.is_zero() {
        tokio::time::sleep(handshake).await;
    }
    let server = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wanlink: cannot connect to upstream {upstream}: {e}");
            return; // dropping `client` closes it
        }
    };
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
    }
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    // Any error (reset, broken pipe) ends the whole connection: try_join drops every half,
    // which closes both sockets. Clean EOFs just half-close and wait for the other way.
    let both = async {
        let _ = tokio::try_join!(
            direction(client_r, server_w, spec, &c.up),
            direction(server_r, client_w, spec, &c.down),
        );
    };
    match cut_after {
        None => both.await,
        // Returning drops every half: both sockets close mid-stream.
        Some(after) => tokio::select! {
            _ = both => {}
            _ = tokio::time::sleep(after) => {
                c.cut.fetch_add(1, Ordering::Relaxed);
            }
        },
    }
}

enum Msg {
    Data {
        bytes: Vec<u8>,
        at: Instant,
        _permit: OwnedSemaphorePermit,
    },
    Eof {
        at: Instant,
    },
}

/// One direction of the link: a pacing reader (the serialiser) feeding a writer that
/// releases each chunk when its delay has elapsed. Chunks in flight overlap, so the delay
/// is pipelined; the writer's queue is the "wire".
async fn direction(
    src: OwnedReadHalf,
    dst: OwnedWriteHalf,
    spec: LinkSpec,
    delivered: &AtomicU64,
) -> io::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::try_join!(serialise(src, tx, spec), deliver(dst, rx, delivered)).map(|_| ())
}

async fn serialise(
    mut src: OwnedReadHalf,
    tx: mpsc::UnboundedSender<Msg>,
    spec: LinkSpec,
) -> io::Result<()> {
    let delay = spec.delay();
    let rate = spec.rate_bits_per_s;
    // Cap chunks to ~2 ms of serialisation so delivery is smooth at low rates.
    let cap = rate.map_or(MAX_CHUNK, |r| {
        ((r / 8 / 500) as usize).clamp(MIN_CHUNK, MAX_CHUNK)
    });
    // Bytes buffered in the proxy (in flight plus unread by the destination): twice the
    // bandwidth-delay product, at least 4 MiB (16 MiB unlimited). Beyond that we stop
    // reading, so the sender feels backpressure.
    let bdp = rate.map_or(8 << 20, |r| (r as f64 / 8.0 * delay.as_secs_f64()) as usize);
    let window = Arc::new(Semaphore::new((2 * bdp).clamp(4 << 20, 256 << 20)));
    let mut buf = vec![0u8; cap];
    let mut free_at = Instant::now(); // when the serialiser has sent everything so far
    loop {
        if rate.is_some() {
            wait_until(free_at).await;
        }
        let n = match src.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                // The reset travels the link too; then everything is torn down.
                tokio::time::sleep(delay).await;
                return Err(e);
            }
        };
        if n == 0 {
            let at = free_at.max(Instant::now()) + delay;
            let _ = tx.send(Msg::Eof { at });
            return Ok(());
        }
        let permit = window
            .clone()
            .acquire_many_owned(n as u32)
            .await
            .expect("never closed");
        let now = Instant::now();
        let sent = match rate {
            None => now,
            Some(r) => {
                let start = free_at.max(now.checked_sub(BURST).unwrap_or(now));
                free_at = start + Duration::from_secs_f64(n as f64 * 8.0 / r as f64);
                free_at.max(now)
            }
        };
        let msg = Msg::Data {
            bytes: buf[..n].to_vec(),
            at: sent + delay,
            _permit: permit,
        };
        if tx.send(msg).is_err() {
            return Ok(()); // the writer failed; it reports the error
        }
    }
}

async fn deliver(
    mut dst: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    delivered: &AtomicU64,
) -> io::Result<()> {
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Data { bytes, at, _permit } => {
                wait_until(at).await;
                dst.write_all(&bytes).await?;
                delivered.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            Msg::Eof { at } => {
                wait_until(at).await;
                return dst.shutdown().await;
            }
        }
    }
    Ok(())
}

/// Sleeps until about `at` (see [`TIMER_SLACK`]); returns at once if it has passed.
async fn wait_until(at: Instant) {
    if at > Instant::now() + TIMER_SLACK {
        sleep_until(at - TIMER_SLACK).await;
    }
}
