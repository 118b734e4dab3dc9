//! The coordinator's HTTP API. Handlers authenticate (signature over the raw body,
//! timestamp, nonce), bound the body, then call the [`Coordinator`] on a blocking
//! thread; every error is a JSON `{"error": ...}` with a status that says whose fault
//! it was. With a [`ServerTls`] it serves HTTPS (see `https`); a plain-HTTP request
//! on that port gets a 400 saying to use https://.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/register` | join (join secret / allowlist), returns the run |
//! | `GET /v1/run` | the run's manifest and codec |
//! | `POST /v1/work` | a lease, `wait`, or `done` |
//! | `POST /v1/leases/{id}/heartbeat` | keep a lease |
//! | `GET /v1/blobs/{blake3}` | a checkpoint (HTTP Range for resuming) |
//! | `POST /v1/updates/{lease}` | a delta (safetensors, codec in its metadata) |
//! | `GET /v1/status` | blocks, workers, bytes moved, recent updates (JSON) |
//! | `GET /metrics` | the same in Prometheus text format |
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use blocktrain_protocol::wire::ErrorBody;

use crate::coordinator::{Coordinator, Status};
use crate::tls::{Fingerprint, ServerTls};
use crate::{now_ms, NodeError};

mod auth;
mod https;
mod metrics;
mod reads;
mod routes;

pub use auth::Gate;
pub use metrics::{process_text, prometheus_text};

/// Shared handle on the coordinator.
pub type Shared = Arc<Mutex<Coordinator>>;

/// Router state.
#[derive(Clone, Debug)]
pub struct AppState {
    pub(crate) coord: Shared,
    pub(crate) gate: Arc<Gate>,
}

impl IntoResponse for NodeError {
    fn into_response(self) -> Response {
        let status = match &self {
            NodeError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            NodeError::Forbidden(_) => StatusCode::FORBIDDEN,
            NodeError::NotFound(_) => StatusCode::NOT_FOUND,
            NodeError::Stale(_) => StatusCode::CONFLICT,
            NodeError::Rejected(_) | NodeError::Config(_) => StatusCode::UNPROCESSABLE_ENTITY,
            NodeError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("{self}");
        }
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

pub(crate) type Reply<T> = std::result::Result<T, NodeError>;

/// Runs `f` on the coordinator on a blocking thread (SQLite, file writes, merges).
pub(crate) async fn with<T: Send + 'static>(
    coord: &Shared,
    f: impl FnOnce(&mut Coordinator) -> Reply<T> + Send + 'static,
) -> Reply<T> {
    let coord = coord.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = coord.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c)
    })
    .await
    .map_err(|e| NodeError::Network(format!("coordinator task failed: {e}")))?
}

/// The dashboard page ([`crate::dashboard`]); it polls `/v1/status` and friends.
async fn index() -> axum::response::Html<&'static str> {
    axum::response::Html(crate::dashboard::PAGE)
}

/// The router over a coordinator.
pub fn router(coord: Shared) -> Router {
    let gate = {
        let c = coord.lock().unwrap_or_else(|p| p.into_inner());
        Arc::new(Gate {
            skew_ms: (c.config().faults.max_skew_secs * 1000.0) as u64,
            started_ms: now_ms(),
            max_update: c.max_update_bytes() as usize,
            nonces: Mutex::new(HashMap::new()),
        })
    };
    Router::new()
        .route("/", get(index))
        .route("/v1/register", post(routes::register))
        .route("/v1/run", get(routes::run_info))
        .route("/v1/work", post(routes::work))
        .route("/v1/leases/{id}/heartbeat", post(routes::heartbeat))
        .route("/v1/blobs/{hash}", get(routes::blob))
        .route("/v1/updates/{lease}", post(routes::update))
        .route("/v1/status", get(reads::status))
        .route("/v1/history", get(reads::history))
        .route("/v1/probe", post(routes::probe))
        .route("/v1/ledger/head", get(reads::ledger_head))
        .route("/v1/ledger/receipts", get(reads::ledger_receipts))
        .route("/v1/ledger/receipts/{index}", get(reads::ledger_receipt))
        .route("/v1/ledger/consistency", get(reads::ledger_consistency))
        .route("/metrics", get(metrics::metrics))
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(AppState { coord, gate })
}

/// Serves `coord` over plain HTTP on `listener` until `shutdown` resolves, ticking
/// leases and rounds every 250 ms.
pub async fn serve(
    listener: tokio::net::TcpListener,
    coord: Shared,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, coord, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    coord: Shared,
    tls: Option<ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let ticker = coord.clone();
    let tick = tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            every.tick().await;
            if let Err(e) = with(&ticker, |co| co.tick(now_ms())).await {
                tracing::error!("tick: {e}");
            }
        }
    });
    let result = match tls {
        Some(tls) => https::serve(listener, router(coord), tls.config, shutdown).await,
        None => {
            // Connect info: `/v1/probe` dials back the caller's own address only.
            let app = router(coord).into_make_service_with_connect_info::<std::net::SocketAddr>();
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    };
    tick.abort();
    result
}

/// A coordinator serving on its own thread and runtime (for the CLI and the demo).
pub struct Running {
    /// The bound address.
    pub addr: std::net::SocketAddr,
    /// The coordinator, for status in-process.
    pub coord: Shared,
    /// The served certificate's fingerprint, with TLS on.
    tls: Option<Fingerprint>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Running({})", self.addr)
    }
}

impl Running {
    /// `https://ADDR` with TLS on, else `http://ADDR`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The served certificate's fingerprint (what workers pin), with TLS on.
    pub fn fingerprint(&self) -> Option<Fingerprint> {
        self.tls
    }

    /// The current status.
    pub fn status(&self) -> crate::Result<Status> {
        self.coord
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status()
    }

    /// Stops serving and waits for in-flight requests.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> std::io::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Binds `listen` and serves `coord` over plain HTTP on a new thread.
pub fn spawn(listen: std::net::SocketAddr, coord: Coordinator) -> crate::Result<Running> {
    spawn_with(listen, coord, None)
}

/// [`spawn`], over TLS when `tls` is given.
pub fn spawn_with(
    listen: std::net::SocketAddr,
    coord: Coordinator,
    tls: Option<ServerTls>,
) -> crate::Result<Running> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| NodeError::Network(format!("tokio runtime: {e}")))?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(listen))
        .map_err(|e| NodeError::Network(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| NodeError::Network(e.to_string()))?;
    let coord: Shared = Arc::new(Mutex::new(coord));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let shared = coord.clone();
    let fingerprint = tls.as_ref().map(|t| t.fingerprint());
    let thread = std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || {
            rt.block_on(serve_with(listener, shared, tls, async {
                let _ = rx.await;
            }))
        })
        .map_err(|e| NodeError::Network(e.to_string()))?;
    Ok(Running {
        addr,
        coord,
        tls: fingerprint,
        stop: Some(tx),
        thread: Some(thread),
    })
}
