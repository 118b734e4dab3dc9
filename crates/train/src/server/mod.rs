//! The coordinator's HTTP API. Handlers authenticate (signature over the raw body,
//! timestamp, nonce), bound the body, then call the [`Coordinator`] on a blocking
//! thread; every error is a JSON `{"error": ...}` with a status that says whose fault
//! it was. With a [`ServerTls`] it serves HTTPS (see `accept`); a plain-HTTP request
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
//! | `POST /v1/servers/announce` | a block server's announcement (signed, admitted like a worker) |
//! | `GET /v1/servers` | live block servers and each model's block coverage and gaps |
//! | `GET /metrics` | the same in Prometheus text format |
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use blocktrain_protocol::wire::ErrorBody;

use crate::coordinator::{Coordinator, Status};
use crate::tls::{Fingerprint, ServerTls};
use crate::{now_ms, NodeError};

mod accept;
mod auth;
mod durable;
mod limits;
mod metrics;
mod reads;
mod routes;
mod servers;

pub use auth::Gate;
pub use metrics::{process_text, prometheus_text};

/// Shared handle on the coordinator.
pub type Shared = Arc<Mutex<Coordinator>>;

/// Router state.
#[derive(Clone, Debug)]
pub struct AppState {
    pub(crate) coord: Shared,
    /// The coordinator's decisions ([`crate::core`]): heartbeats and work requests that
    /// write nothing are answered from it without the coordinator's lock.
    pub(crate) core: Arc<Mutex<crate::core::Core>>,
    pub(crate) gate: Arc<Gate>,
    /// The status as of the last tick: public reads never take the coordinator's lock.
    pub(crate) snapshot: Snapshot,
    /// A second connection to the database, for the ledger's public reads (WAL lets
    /// it read while the coordinator writes).
    pub(crate) reader: Arc<Mutex<rusqlite::Connection>>,
    /// Bounds the uploads vetted at once (each decodes, screens, maybe recomputes).
    pub(crate) vetting: Arc<tokio::sync::Semaphore>,
    /// Makes each reply's writes durable (one fsync for many requests); None: every
    /// commit fsyncs by itself (`BLOCKTRAIN_SYNC_EVERY_COMMIT=1`, for `bench load`'s
    /// side-by-side comparison).
    pub(crate) durable: Option<Arc<durable::GroupCommit>>,
    /// The address this coordinator listens on, when known (`/v1/probe` dials
    /// loopback only when the coordinator itself is on loopback).
    pub(crate) bound: Option<std::net::SocketAddr>,
    /// A lease's life, ms (`/metrics` counts workers heard from within one as active).
    pub(crate) lease_ms: u64,
    /// When a consistency proof to an older log size was last served.
    pub(crate) prefix_proofs: Arc<Mutex<Option<std::time::Instant>>>,
    /// Bounds the upload bodies buffered at once (before their signature can be checked,
    /// a body must be read whole): beyond it, uploads are told to retry.
    pub(crate) upload_bodies: Arc<tokio::sync::Semaphore>,
    /// Block servers' announcements ([`crate::registry`]): soft state, not journaled.
    pub(crate) registry: Arc<Mutex<crate::registry::Registry>>,
}

impl AppState {
    /// Waits until this request's writes are on disk.
    pub(crate) async fn synced(&self) -> Reply<()> {
        match &self.durable {
            Some(gc) => gc.synced().await,
            None => Ok(()),
        }
    }
}

/// The last status the ticker computed, and its JSON (serialised once per tick, so a
/// public read is a copy).
pub type Snapshot = Arc<RwLock<Option<Arc<(Status, axum::body::Bytes)>>>>;

/// A lock-free-for-readers copy of the status: the ticker refreshes it every
/// [`SNAPSHOT_EVERY`] under the lock it holds anyway.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(250);

/// Most time a request other than an upload or a download may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Upload bodies buffered at once (each at most the run's update limit).
const UPLOAD_BODIES: usize = 8;

/// Most time an upload's body may take to arrive (a slow sender holds a connection
/// and a buffer while it trickles).
pub(crate) const UPLOAD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

impl IntoResponse for NodeError {
    fn into_response(self) -> Response {
        let status = match &self {
            NodeError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            NodeError::Forbidden(_) => StatusCode::FORBIDDEN,
            NodeError::NotFound(_) => StatusCode::NOT_FOUND,
            NodeError::Stale(_) => StatusCode::CONFLICT,
            NodeError::Rejected(_) | NodeError::Config(_) => StatusCode::UNPROCESSABLE_ENTITY,
            NodeError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            NodeError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            NodeError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // The coordinator's own failures (database, files, a panicked task) are logged
        // in full and answered without detail: their text names paths and internals.
        let error = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("{self}");
            INTERNAL.to_string()
        } else {
            self.to_string()
        };
        let mut resp = (status, Json(ErrorBody { error })).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        resp
    }
}

pub(crate) type Reply<T> = std::result::Result<T, NodeError>;

/// The answer to a request that failed on the coordinator's side.
const INTERNAL: &str = "internal error in the coordinator (its log has the details)";

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

/// Merges block `block`'s round if it is ready: the job is taken under the coordinator's
/// lock, runs on the blocking pool without it (heartbeats, work requests and decisions
/// go on meanwhile), and is committed under the lock again; the commit is flushed before
/// this returns.
pub(crate) async fn close_round(s: &AppState, block: usize) -> Reply<()> {
    let Some(job) = with(&s.coord, move |co| co.begin_merge(block, now_ms())).await? else {
        return Ok(());
    };
    let merged = match tokio::task::spawn_blocking(move || job.run()).await {
        Ok(merged) => merged,
        Err(e) => {
            with(&s.coord, move |co| {
                co.abort_merge(block);
                Ok(())
            })
            .await?;
            return Err(NodeError::Network(format!("merge task failed: {e}")));
        }
    };
    with(&s.coord, move |co| co.finish_merge(merged, now_ms())).await?;
    s.synced().await
}

/// Every error a client sees is the JSON error body: axum's own rejections (bad JSON,
/// wrong content type, a bad path, an unknown route, an oversized body) come as text,
/// and are rewrapped here.
async fn json_errors(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(resp.status().is_client_error() || resp.status().is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let mut error = String::from_utf8_lossy(&text).trim().to_string();
    if parts.status.is_server_error() {
        error = INTERNAL.to_string();
    } else if error.is_empty() {
        error = parts
            .status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_lowercase();
    }
    let body = serde_json::to_vec(&ErrorBody { error }).expect("error bodies serialise");
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// A panicking handler is logged with its message; the client gets the JSON error body
/// without it.
fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let msg = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!("request handler panicked: {msg}");
    let body = Json(ErrorBody {
        error: INTERNAL.to_string(),
    });
    (StatusCode::INTERNAL_SERVER_ERROR, body).into_response()
}

/// Stores `status` as the snapshot (serialised here, outside the coordinator's lock).
pub(crate) fn store_snapshot(status: Status, snapshot: &Snapshot) {
    let json = serde_json::to_vec(&status).expect("status serialises");
    *snapshot.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new((status, json.into())));
}

/// The dashboard page ([`crate::dashboard`]); it polls `/v1/status` and friends.
async fn index() -> axum::response::Html<&'static str> {
    axum::response::Html(crate::dashboard::PAGE)
}

/// The router over a coordinator (its address unknown: `/v1/probe` then never dials
/// loopback).
pub fn router(coord: Shared) -> Router {
    app(coord, None)
        .expect("the coordinator's database opens for reading")
        .0
}

/// The router and its state, for a coordinator listening on `bound`.
pub(crate) fn app(
    coord: Shared,
    bound: Option<std::net::SocketAddr>,
) -> crate::Result<(Router, AppState)> {
    let (gate, reader, wal, lease_ms, core) = {
        let mut c = coord.lock().unwrap_or_else(|p| p.into_inner());
        let gate = Gate::new(
            (c.config().faults.max_skew_secs * 1000.0) as u64,
            now_ms(),
            c.max_update_bytes() as usize,
        );
        let group_commit = std::env::var_os("BLOCKTRAIN_SYNC_EVERY_COMMIT").is_none();
        let wal = match group_commit {
            true => Some(c.defer_sync()?),
            false => None,
        };
        let lease_ms = (c.config().faults.lease_secs * 1000.0) as u64;
        (Arc::new(gate), c.open_reader()?, wal, lease_ms, c.core())
    };
    let state = AppState {
        coord,
        core,
        gate,
        snapshot: Arc::new(RwLock::new(None)),
        reader: Arc::new(Mutex::new(reader)),
        vetting: Arc::new(tokio::sync::Semaphore::new(vet_slots())),
        durable: wal.map(durable::GroupCommit::start),
        bound,
        lease_ms,
        prefix_proofs: Arc::new(Mutex::new(None)),
        upload_bodies: Arc::new(tokio::sync::Semaphore::new(UPLOAD_BODIES)),
        registry: Arc::new(Mutex::new(crate::registry::Registry::default())),
    };
    // Uploads and downloads carry their own limits (a body deadline; a file served in
    // ranges); everything else answers within REQUEST_TIMEOUT.
    let transfers = Router::new()
        .route("/v1/blobs/{hash}", get(routes::blob))
        .route("/v1/updates/{lease}", post(routes::update));
    let public = Router::new()
        .route("/", get(index))
        .route("/v1/status", get(reads::status))
        .route("/v1/history", get(reads::history))
        .route("/v1/ledger/head", get(reads::ledger_head))
        .route("/v1/ledger/receipts", get(reads::ledger_receipts))
        .route("/v1/ledger/receipts/{index}", get(reads::ledger_receipt))
        .route("/v1/ledger/consistency", get(reads::ledger_consistency))
        .route("/v1/servers", get(servers::list))
        .route("/metrics", get(metrics::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            reads::limit_reads,
        ));
    let signed = Router::new()
        .route("/v1/register", post(routes::register))
        .route("/v1/run", get(routes::run_info))
        .route("/v1/work", post(routes::work))
        .route("/v1/leases/{id}/heartbeat", post(routes::heartbeat))
        .route("/v1/probe", post(routes::probe))
        .route("/v1/servers/announce", post(servers::announce));
    let timed = public
        .merge(signed)
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ));
    let router = timed
        .merge(transfers)
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .layer(axum::middleware::map_response(json_errors))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .with_state(state.clone());
    Ok((router, state))
}

/// Uploads vetted at once: the cores less one, so requests keep a core.
fn vet_slots() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
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
    let (app, state) = app(coord.clone(), listener.local_addr().ok())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let ticker = coord.clone();
    let tick = tokio::spawn(async move {
        let mut every = tokio::time::interval(SNAPSHOT_EVERY);
        loop {
            every.tick().await;
            let ticked = with(&ticker, move |co| {
                let ready = co.tick_journal(now_ms()).unwrap_or_else(|e| {
                    tracing::error!("tick: {e}");
                    Vec::new()
                });
                Ok((ready, co.status()?))
            });
            let ready = match ticked.await {
                Ok((ready, status)) => {
                    store_snapshot(status, &state.snapshot);
                    ready
                }
                Err(e) => {
                    tracing::error!("status snapshot not refreshed: {e}");
                    Vec::new()
                }
            };
            // Rounds at their deadline merge off the lock, in tasks of their own, so the
            // ticker goes on writing soft state and snapshots meanwhile (the core marks a
            // round closing: it is never merged twice).
            for block in ready {
                let state = state.clone();
                tokio::spawn(async move {
                    if let Err(e) = close_round(&state, block).await {
                        tracing::error!("block {}: round not closed: {e}", block + 1);
                    }
                });
            }
            // What the tick committed (lapsed leases, closed rounds, receipts and tree
            // heads) is flushed before the next tick, whether or not a request follows.
            if let Err(e) = state.synced().await {
                tracing::error!("tick: {e}");
            }
        }
    });
    let result = accept::serve(listener, app, tls.map(|t| t.config), shutdown).await;
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
