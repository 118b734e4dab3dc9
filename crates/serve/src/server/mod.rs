//! The block server: accepts frames over TCP, runs its blocks, forwards downstream.
//!
//! A diffusion request arrives as one `Denoise` frame (masked family) or `Latent` frame
//! (embedding family, below the top stage). The server checks it (model, blocks,
//! sizes), runs its blocks, and either answers with the `Result` (last stage) or sends
//! the partially unmasked bytes, or the latent, to the next stage
//! ([`hop::call_stage`](crate::hop::call_stage): its replicas in turn) and relays that
//! stage's answer back. Every computed pass is counted (`ServerInfo::served`), so
//! traversals are measured by the servers. While it works or waits it sends `Keepalive`
//! frames upstream every `keepalive`, so its caller can tell slow
//! from stalled.
//!
//! An AR session is one connection: each `ArStep` frame runs this stage's layers
//! against the session's KV cache and goes on over a persistent connection to the next
//! stage; the last stage samples the byte and the `ArOutput` travels back.
//!
//! Compute is serialised (one batch or AR step at a time) off the async threads:
//! diffusion requests on the compute thread of `batch`, which computes concurrent
//! requests of one length and steps together ([`BatchOptions`]; each keeps its own
//! random draws, so its output is the same batched or not), AR steps on the blocking
//! pool. A panic in it becomes an `Internal` error for that request, never a dead
//! server. A bad frame gets an error reply and the connection is closed.
//!
//! Every peer is treated as hostile:
//! - **No open relay.** A server forwards only to replicas whose greeting shows its own
//!   model and the blocks the route names (and, with `peers`, only to those addresses;
//!   a server not on loopback never dials a loopback address unless it is a peer), so
//!   a route naming `127.0.0.1:22` or another model's server gets a `Refused` error and
//!   nothing is written there.
//! - **Caps** ([`Caps`]): connections in all and per client IP (refused before the
//!   greeting), a request rate per client, the bytes of frames all connections hold at
//!   once (taken at a frame's header, before its payload is allocated; a frame that does
//!   not fit is refused and its payload discarded; answers from the next stage count
//!   until relayed, and one that does not fit fails that replica as busy), requests
//!   computing or queued, and a
//!   compute budget (tokens x steps) per request; each refusal names its limit.
//! - **Deadlines**: an idle connection is closed after `idle_timeout`, a frame that
//!   has started must complete within `frame_deadline` (slowloris), and a call to the
//!   next stage must be answered within [`HopLimits::deadline`] however many keepalives
//!   its replica sends.
//! - **Authentication** (optional, [`ClientAuth`]): a `Hello` per connection signing its
//!   greeting's challenge, checked against an allowlist and/or a join secret. A server
//!   authenticates downstream with its own key.
//!
//! Here: options, the accept loop, the state connections share (with the pass
//! counter); `conn` reads a connection's frames and replies, `gate` admits connections
//! and requests, `auth` checks `Hello`s, `check` holds the checks every hop makes,
//! `denoise` and `ar` run and forward the two kinds of request, `batch` computes
//! diffusion requests in batches.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blocktrain_protocol::identity::Identity;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpListener;
use tokio::sync::Mutex as AsyncMutex;

use crate::framed::FrameDeadline;
use crate::hop::{Credentials, Expect, HopLimits};
use crate::hosted::Hosted;

mod ar;
pub mod auth;
mod batch;
mod check;
mod conn;
mod denoise;
mod gate;

pub use auth::ClientAuth;
pub use batch::{BatchOptions, MAX_BATCH_LIMIT};
pub use gate::Caps;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Limits for this server's calls downstream (and the frame size it accepts).
    pub limits: HopLimits,
    /// Interval of keepalive frames sent upstream while a request is in progress.
    pub keepalive: Duration,
    /// A connection with no frame for this long is closed.
    pub idle_timeout: Duration,
    /// Name reported in hop statistics (default: the listen address).
    pub name: String,
    /// A frame that has started must complete within this (slowloris).
    pub frame_deadline: FrameDeadline,
    /// Connection, rate, concurrency and compute limits.
    pub caps: Caps,
    /// Who may connect (default: anyone).
    pub auth: ClientAuth,
    /// This server's key: in its greeting, and its `Hello` to the next stage (unless
    /// `limits.credentials` names another).
    pub identity: Identity,
    /// When set, the only addresses this server forwards to (as routes write them);
    /// each must still greet as a server of this model. None: any address on the
    /// route whose greeting shows this model and the route's blocks.
    pub peers: Option<Vec<String>>,
    /// How diffusion requests are batched.
    pub batch: BatchOptions,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            limits: HopLimits::default(),
            keepalive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(300),
            name: String::new(),
            frame_deadline: FrameDeadline::default(),
            caps: Caps::default(),
            auth: ClientAuth::default(),
            identity: Identity::generate(),
            peers: None,
            batch: BatchOptions::default(),
        }
    }
}

struct Shared {
    hosted: Arc<Mutex<Hosted>>,
    /// Computes diffusion requests in batches (on its own thread, sharing `hosted`).
    batcher: batch::Batcher,
    info: blocktrain_protocol::frame::ServerInfo,
    opts: ServeOptions,
    /// Passes computed: diffusion requests run, AR steps run.
    served: AtomicU64,
    /// Microseconds those passes took (admission to result).
    busy_us: AtomicU64,
    /// Connections accepted since start (admitted or not).
    accepted: AtomicU64,
    gate: Arc<gate::Gate>,
    /// Listening off loopback: never forward to this host (except to peers).
    public: bool,
    key: String,
}

impl Shared {
    /// Counts one computed pass that began (was admitted) at `started`.
    fn passed(&self, started: std::time::Instant) {
        self.served.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.busy_us.fetch_add(us, Ordering::Relaxed);
    }

    /// What a replica of the next stage must be (its blocks come from the route).
    fn expect(&self) -> Expect<'_> {
        Expect {
            model_id: Some(&self.info.model_id),
            blocks: None,
            peers: self.opts.peers.as_deref(),
            no_loopback: self.public,
        }
    }
}

type Upstream = Arc<AsyncMutex<OwnedWriteHalf>>;

/// Serves `hosted` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, hosted: Hosted, mut opts: ServeOptions) {
    let local = listener.local_addr().ok();
    if opts.name.is_empty() {
        opts.name = local.map_or_else(|| "?".into(), |a| a.to_string());
    }
    if opts.limits.credentials.is_none() {
        opts.limits.credentials = Some(Arc::new(Credentials {
            identity: opts.identity.clone(),
            join_secret: opts.auth.join_secret.clone(),
        }));
    }
    let info = hosted.info.clone();
    let hosted = Arc::new(Mutex::new(hosted));
    let gate = Arc::new(gate::Gate::new(opts.caps.clone()));
    // Answers from the next stage are held in the same budget as requests.
    opts.limits.budget = Some(gate.budget().clone());
    let shared = Arc::new(Shared {
        info,
        batcher: batch::Batcher::start(hosted.clone(), opts.batch.clone()),
        hosted,
        gate,
        key: opts.identity.public_hex(),
        opts,
        served: AtomicU64::new(0),
        busy_us: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        public: local.is_none_or(|a| !a.ip().is_loopback()),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, say: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        match shared.gate.connect(peer.ip()) {
            Ok(slot) => tokio::spawn(conn::handle(stream, peer, slot, shared.clone())),
            Err((code, why)) => tokio::spawn(conn::refuse(stream, code, why, shared.clone())),
        };
    }
}

/// Serves `hosted` on a runtime of its own in a background thread (tests, benches).
pub fn spawn(addr: SocketAddr, hosted: Hosted, opts: ServeOptions) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async move {
            let listener = TcpListener::from_std(std_listener).expect("listener");
            serve(listener, hosted, opts).await
        });
    });
    Ok(local)
}
