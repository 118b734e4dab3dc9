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
//! Compute is serialised (one request's blocks at a time) and runs on the blocking
//! pool; a panic in it becomes an `Internal` error for that request, never a dead
//! server. A bad frame gets an error reply and the connection is closed.
//!
//! Here: options, the accept loop, the state connections share (with the pass
//! counter); `conn` reads a connection's frames and replies, `check` holds the checks
//! every hop makes, `denoise` and `ar` run and forward the two kinds of request.
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpListener;
use tokio::sync::Mutex as AsyncMutex;

use crate::hop::HopLimits;
use crate::hosted::Hosted;

mod ar;
mod check;
mod conn;
mod denoise;

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
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            limits: HopLimits::default(),
            keepalive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(300),
            name: String::new(),
        }
    }
}

struct Shared {
    hosted: Mutex<Hosted>,
    info: blocktrain_protocol::frame::ServerInfo,
    opts: ServeOptions,
    /// Passes computed: diffusion requests run, AR steps run.
    served: AtomicU64,
}

type Upstream = Arc<AsyncMutex<OwnedWriteHalf>>;

/// Serves `hosted` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, hosted: Hosted, mut opts: ServeOptions) {
    if opts.name.is_empty() {
        opts.name = listener
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
    }
    let shared = Arc::new(Shared {
        info: hosted.info.clone(),
        hosted: Mutex::new(hosted),
        opts,
        served: AtomicU64::new(0),
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
        tokio::spawn(conn::handle(stream, peer, shared.clone()));
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
