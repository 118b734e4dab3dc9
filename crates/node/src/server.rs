//! The coordinator's HTTP API. Handlers authenticate (signature over the raw body,
//! timestamp, nonce), bound the body, then call the [`Coordinator`] on a blocking
//! thread; every error is a JSON `{"error": ...}` with a status that says whose fault
//! it was.
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
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use blocktrain_protocol::receipt::{Claim, ReceiptProof};

use crate::ledger::Ledger;
use blocktrain_protocol::signed::{self, Auth};
use blocktrain_protocol::wire::{ErrorBody, HeartbeatReply, RegisterRequest, WorkerInfo};
use tower::ServiceExt;

use crate::coordinator::{short, Coordinator, Status};
use crate::{now_ms, NodeError};

/// Shared handle on the coordinator.
pub type Shared = Arc<Mutex<Coordinator>>;

/// What request checks need, kept apart from the coordinator's lock so that async code
/// never waits on a merge.
#[derive(Debug)]
pub struct Gate {
    skew_ms: u64,
    started_ms: u64,
    max_update: usize,
    nonces: Mutex<HashMap<String, u64>>,
}

impl Gate {
    /// Remembers a nonce; false if seen within the skew window (a replay).
    fn fresh(&self, key: &str, nonce: &str, now: u64) -> bool {
        let mut n = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        if n.len() > 10_000 {
            let window = 2 * self.skew_ms;
            n.retain(|_, t| now.saturating_sub(*t) < window);
        }
        n.insert(format!("{key}/{nonce}"), now).is_none()
    }
}

/// Router state.
#[derive(Clone, Debug)]
pub struct AppState {
    coord: Shared,
    gate: Arc<Gate>,
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

type Reply<T> = std::result::Result<T, NodeError>;

/// Runs `f` on the coordinator on a blocking thread (SQLite, file writes, merges).
async fn with<T: Send + 'static>(
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

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The signature headers, parsed; the key must be lowercase hex so that one key has one
/// spelling (the nonce cache and the allowlist compare strings).
fn auth_headers(headers: &HeaderMap) -> Reply<Auth> {
    let missing = |h: &str| {
        NodeError::Unauthenticated(format!(
            "request is not signed (no {h} header): workers sign every request with their key"
        ))
    };
    let key = header(headers, signed::KEY_HEADER).ok_or_else(|| missing(signed::KEY_HEADER))?;
    if key.len() != 64
        || !key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(NodeError::Unauthenticated(
            "x-bt-key must be a public key of 64 lowercase hex digits".into(),
        ));
    }
    Ok(Auth {
        key: key.to_string(),
        time_ms: header(headers, signed::TIME_HEADER)
            .ok_or_else(|| missing(signed::TIME_HEADER))?
            .parse()
            .map_err(|_| NodeError::Unauthenticated("x-bt-time is not a number".into()))?,
        nonce: header(headers, signed::NONCE_HEADER)
            .ok_or_else(|| missing(signed::NONCE_HEADER))?
            .to_string(),
        sig: header(headers, signed::SIG_HEADER)
            .ok_or_else(|| missing(signed::SIG_HEADER))?
            .to_string(),
    })
}

/// Checks a request's signature (over method, path with query, time, nonce, body), its
/// age and its nonce; returns the signer's key. Requests signed before this process
/// started are refused, so a restart does not reopen the replay window (clients re-sign
/// when they retry).
fn authenticate(
    gate: &Gate,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Reply<String> {
    let auth = auth_headers(headers)?;
    let now = now_ms();
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    signed::verify_request(&auth, method.as_str(), path, body, now, gate.skew_ms).map_err(|e| {
        NodeError::Unauthenticated(match e {
            blocktrain_protocol::ProtocolError::Unauthenticated(m) => m,
            other => other.to_string(),
        })
    })?;
    if auth.time_ms + 1000 < gate.started_ms {
        return Err(NodeError::Unauthenticated(
            "request signed before this coordinator started; sign it again".into(),
        ));
    }
    if !gate.fresh(&auth.key, &auth.nonce, now) {
        return Err(NodeError::Unauthenticated(
            "replayed request (nonce already used)".into(),
        ));
    }
    Ok(auth.key)
}

async fn register(
    State(s): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Reply<impl IntoResponse> {
    let key = authenticate(&s.gate, &Method::POST, &uri, &headers, &body)?;
    let req: RegisterRequest = serde_json::from_slice(&body)
        .map_err(|e| NodeError::Rejected(format!("register body: {e}")))?;
    let info = with(&s.coord, move |co| co.register(&key, &req, now_ms())).await?;
    Ok(Json(info))
}

/// `POST /v1/probe` (signed, body `{"port": P}`): can this coordinator open a TCP
/// connection to the caller's own IP at port P? Only the address the request came from
/// is dialled, so the endpoint cannot be used to scan anyone else.
async fn probe(
    State(s): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Reply<impl IntoResponse> {
    authenticate(&s.gate, &Method::POST, &uri, &headers, &body)?;
    #[derive(serde::Deserialize)]
    struct ProbeRequest {
        port: u16,
    }
    let req: ProbeRequest = serde_json::from_slice(&body)
        .map_err(|e| NodeError::Rejected(format!("probe body: {e}")))?;
    let target = std::net::SocketAddr::new(peer.ip(), req.port);
    let t0 = std::time::Instant::now();
    let dial = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        tokio::net::TcpStream::connect(target),
    )
    .await;
    let (reachable, error) = match dial {
        Ok(Ok(_)) => (true, None),
        Ok(Err(e)) => (false, Some(e.to_string())),
        Err(_) => (false, Some("no answer within 3 s".to_string())),
    };
    Ok(Json(serde_json::json!({
        "seen_as": peer.ip().to_string(),
        "target": target.to_string(),
        "reachable": reachable,
        "ms": t0.elapsed().as_secs_f64() * 1e3,
        "error": error,
        "server_time_ms": now_ms(),
    })))
}

async fn run_info(
    State(s): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Reply<impl IntoResponse> {
    let key = authenticate(&s.gate, &Method::GET, &uri, &headers, b"")?;
    let info = with(&s.coord, move |co| {
        if !co.is_registered(&key)? {
            return Err(NodeError::Unauthenticated(format!(
                "unknown worker {}: register first",
                short(&key)
            )));
        }
        Ok(co.run_info())
    })
    .await?;
    Ok(Json(info))
}

async fn work(
    State(s): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Reply<impl IntoResponse> {
    let key = authenticate(&s.gate, &Method::POST, &uri, &headers, &body)?;
    let info: WorkerInfo = serde_json::from_slice(&body)
        .map_err(|e| NodeError::Rejected(format!("work body: {e}")))?;
    Ok(Json(
        with(&s.coord, move |co| co.request_work(&key, &info, now_ms())).await?,
    ))
}

async fn heartbeat(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    uri: Uri,
    headers: HeaderMap,
) -> Reply<impl IntoResponse> {
    let key = authenticate(&s.gate, &Method::POST, &uri, &headers, b"")?;
    let still_wanted = with(&s.coord, move |co| co.heartbeat(&key, id, now_ms())).await?;
    Ok(Json(HeartbeatReply { still_wanted }))
}

async fn blob(
    State(s): State<AppState>,
    Path(hash): Path<String>,
    req: Request,
) -> Reply<Response> {
    let key = authenticate(&s.gate, &Method::GET, req.uri(), req.headers(), b"")?;
    let k = key.clone();
    let (file, block) = with(&s.coord, move |co| co.checkpoint_file(&k, &hash)).await?;
    let resp = tower_http::services::ServeFile::new(file)
        .oneshot(req)
        .await
        .map_err(|e| NodeError::Network(format!("serving checkpoint: {e}")))?;
    if resp.status().is_success() {
        let sent: u64 = resp
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        with(&s.coord, move |co| co.count_download(&key, block, sent)).await?;
    }
    Ok(resp.map(Body::new))
}

#[derive(serde::Deserialize)]
struct UpdateQuery {
    loss: Option<f64>,
}

/// Uploads are checked in order of cost: signature headers, registration and lease
/// ownership before the body is read; the size while it streams; the signature over
/// the bytes; then the coordinator's validation. Refusals are recorded against the
/// lease when the claimed key is its registered owner (a stranger's noise is not).
async fn update(
    State(s): State<AppState>,
    Path(lease): Path<i64>,
    Query(q): Query<UpdateQuery>,
    req: Request,
) -> Reply<impl IntoResponse> {
    let (parts, body) = req.into_parts();
    let claimed = auth_headers(&parts.headers)?.key;
    let c = claimed.clone();
    let owner = with(&s.coord, move |co| co.lease_owner(&c, lease)).await?;
    let limit = s.gate.max_update;
    let reject = |reason: String, bytes: u64, err: NodeError| {
        let coord = s.coord.clone();
        let claimed = claimed.clone();
        async move {
            if owner {
                with(&coord, move |co| {
                    co.record_rejection(&claimed, Some(lease), bytes, &reason, now_ms())
                })
                .await?;
            }
            Err::<Json<blocktrain_protocol::wire::UpdateReply>, _>(err)
        }
    };
    let declared: Option<u64> =
        header(&parts.headers, "content-length").and_then(|v| v.parse().ok());
    if let Some(n) = declared.filter(|&n| n as usize > limit) {
        let msg = format!("update of {n} bytes exceeds the limit of {limit}");
        return reject(msg.clone(), 0, NodeError::TooLarge(msg)).await;
    }
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            let msg = format!("upload interrupted or over {limit} bytes: {e}; nothing stored");
            return reject(msg.clone(), 0, NodeError::Rejected(msg)).await;
        }
    };
    let key = match authenticate(&s.gate, &Method::POST, &parts.uri, &parts.headers, &body) {
        Ok(k) => k,
        Err(e) => return reject(e.to_string(), body.len() as u64, e).await,
    };
    let claim = claim_headers(&parts.headers);
    let reply = with(&s.coord, move |co| {
        co.submit_update(&key, lease, &body, q.loss, claim, now_ms())
    })
    .await?;
    Ok(Json(reply))
}

/// The worker's signed claim about its upload: `x-blocktrain-claim` (hex of the
/// claim's JSON) and `x-blocktrain-claim-sig`. Absent or unreadable: None (the
/// coordinator then refuses the update, with a receipt saying why).
fn claim_headers(h: &axum::http::HeaderMap) -> Option<(Claim, String)> {
    let json = hex::decode(header(h, "x-blocktrain-claim")?).ok()?;
    let claim = serde_json::from_slice(&json).ok()?;
    Some((claim, header(h, "x-blocktrain-claim-sig")?.to_string()))
}

/// `GET /v1/history`: held-out loss per block and version (the dashboard's chart).
async fn history(State(s): State<AppState>) -> Reply<impl IntoResponse> {
    let h = with(&s.coord, |co| co.heldout_history()).await?;
    let blocks: Vec<_> = h
        .into_iter()
        .enumerate()
        .map(|(b, pts)| {
            let points: Vec<_> = pts
                .into_iter()
                .map(|(v, t, l)| serde_json::json!({"version": v, "time_ms": t, "heldout": l}))
                .collect();
            serde_json::json!({"block": b, "points": points})
        })
        .collect();
    Ok(Json(serde_json::json!({ "blocks": blocks })))
}

/// `GET /v1/ledger/head`: the latest signed tree head.
async fn ledger_head(State(s): State<AppState>) -> Reply<impl IntoResponse> {
    let head = with(&s.coord, |co| Ledger::latest_head(co.conn())).await?;
    head.map(Json)
        .ok_or_else(|| NodeError::NotFound("the ledger is empty".into()))
}

#[derive(serde::Deserialize)]
struct ReceiptsQuery {
    worker: Option<String>,
    recent: Option<usize>,
}

/// `GET /v1/ledger/receipts?worker=KEY` (all of that worker's) or `?recent=N` (newest
/// first, default 20): one summary line per receipt, with its index.
async fn ledger_receipts(
    State(s): State<AppState>,
    Query(q): Query<ReceiptsQuery>,
) -> Reply<impl IntoResponse> {
    let rows = with(&s.coord, move |co| match &q.worker {
        Some(w) => Ledger::receipts_of(co.conn(), w),
        None => {
            let mut all = Ledger::entries(co.conn())?;
            all.reverse();
            all.truncate(q.recent.unwrap_or(20).min(1000));
            Ok(all)
        }
    })
    .await?;
    let receipts: Vec<_> = rows
        .iter()
        .map(|(i, r)| {
            serde_json::json!({
                "index": i, "worker": r.claim.worker, "block": r.claim.block,
                "base_version": r.claim.base_version, "steps": r.claim.steps,
                "accepted": r.decision.accepted, "reason": r.decision.reason,
                "resulting_version": r.decision.resulting_version,
                "heldout_before": r.decision.heldout_before,
                "heldout_after": r.decision.heldout_after,
                "time_ms": r.decision.time_ms, "worker_signed": r.claim_sig.is_some(),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "receipts": receipts })))
}

/// `GET /v1/ledger/receipts/{index}`: the receipt, the latest signed tree head and the
/// inclusion proof against it (`blocktrain ledger check-proof` reads this JSON).
async fn ledger_receipt(
    State(s): State<AppState>,
    Path(index): Path<u64>,
) -> Reply<impl IntoResponse> {
    let proof = with(&s.coord, move |co| {
        let receipt = Ledger::receipt(co.conn(), index)?
            .ok_or_else(|| NodeError::NotFound(format!("no receipt {index}")))?;
        let head = Ledger::latest_head(co.conn())?
            .ok_or_else(|| NodeError::NotFound("no signed tree head yet".into()))?;
        let proof = co.ledger().prove_inclusion(index, head.size)?;
        Ok(ReceiptProof {
            receipt,
            head,
            proof,
        })
    })
    .await?;
    Ok(Json(proof))
}

#[derive(serde::Deserialize)]
struct ConsistencyQuery {
    from: u64,
    to: Option<u64>,
}

/// `GET /v1/ledger/consistency?from=A[&to=B]`: proof that the log of size B (default:
/// the latest head) extends the log of size A.
async fn ledger_consistency(
    State(s): State<AppState>,
    Query(q): Query<ConsistencyQuery>,
) -> Reply<impl IntoResponse> {
    let proof = with(&s.coord, move |co| {
        let to = match q.to {
            Some(t) => t,
            None => Ledger::latest_head(co.conn())?.map_or(0, |h| h.size),
        };
        if q.from > to {
            return Err(NodeError::Rejected(format!(
                "from {} is past the log's size {to}",
                q.from
            )));
        }
        co.ledger().prove_consistency(q.from, to)
    })
    .await?;
    Ok(Json(proof))
}

async fn status(State(s): State<AppState>) -> Reply<impl IntoResponse> {
    Ok(Json(with(&s.coord, |co| co.status()).await?))
}

async fn metrics(State(st): State<AppState>) -> Reply<impl IntoResponse> {
    let s = with(&st.coord, |co| co.status()).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        prometheus_text(&s),
    ))
}

/// The dashboard page ([`crate::dashboard`]); it polls `/v1/status` and friends.
async fn index() -> axum::response::Html<&'static str> {
    axum::response::Html(crate::dashboard::PAGE)
}

/// Renders the status in the Prometheus text exposition format.
pub fn prometheus_text(s: &Status) -> String {
    let mut o = String::new();
    let mut put = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let b = |i: usize| format!("block=\"{}\"", i + 1);
    put(
        "blocktrain_block_version",
        "gauge",
        "Committed version of each block.",
        s.blocks
            .iter()
            .map(|x| (format!("{{{}}}", b(x.block)), x.version as f64))
            .collect(),
    );
    put(
        "blocktrain_block_steps",
        "counter",
        "Local optimizer steps merged into each block.",
        s.blocks
            .iter()
            .map(|x| (format!("{{{}}}", b(x.block)), x.steps as f64))
            .collect(),
    );
    put(
        "blocktrain_active_leases",
        "gauge",
        "Leases out now, per block.",
        s.blocks
            .iter()
            .map(|x| (format!("{{{}}}", b(x.block)), x.active_leases as f64))
            .collect(),
    );
    let mut bytes = Vec::new();
    for x in &s.blocks {
        bytes.push((
            format!("{{{},direction=\"up\"}}", b(x.block)),
            x.bytes_up as f64,
        ));
        bytes.push((
            format!("{{{},direction=\"down\"}}", b(x.block)),
            x.bytes_down as f64,
        ));
    }
    put(
        "blocktrain_block_bytes_total",
        "counter",
        "Bytes moved per block (up = updates, down = checkpoints).",
        bytes,
    );
    let mut wb = Vec::new();
    for w in &s.workers {
        wb.push((
            format!("{{worker=\"{}\",direction=\"up\"}}", short(&w.key)),
            w.bytes_up as f64,
        ));
        wb.push((
            format!("{{worker=\"{}\",direction=\"down\"}}", short(&w.key)),
            w.bytes_down as f64,
        ));
    }
    put(
        "blocktrain_worker_bytes_total",
        "counter",
        "Bytes moved per worker.",
        wb,
    );
    let mut states: Vec<_> = s.updates.iter().collect();
    states.sort();
    put(
        "blocktrain_updates_total",
        "counter",
        "Updates received, by state.",
        states
            .into_iter()
            .map(|(k, v)| (format!("{{state=\"{k}\"}}"), *v as f64))
            .collect(),
    );
    put(
        "blocktrain_workers",
        "gauge",
        "Registered workers.",
        vec![(String::new(), s.workers.len() as f64)],
    );
    put(
        "blocktrain_run_done",
        "gauge",
        "1 once every block has all its versions.",
        vec![(String::new(), s.done as u8 as f64)],
    );
    o
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
        .route("/v1/register", post(register))
        .route("/v1/run", get(run_info))
        .route("/v1/work", post(work))
        .route("/v1/leases/{id}/heartbeat", post(heartbeat))
        .route("/v1/blobs/{hash}", get(blob))
        .route("/v1/updates/{lease}", post(update))
        .route("/v1/status", get(status))
        .route("/v1/history", get(history))
        .route("/v1/probe", post(probe))
        .route("/v1/ledger/head", get(ledger_head))
        .route("/v1/ledger/receipts", get(ledger_receipts))
        .route("/v1/ledger/receipts/{index}", get(ledger_receipt))
        .route("/v1/ledger/consistency", get(ledger_consistency))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(AppState { coord, gate })
}

/// Serves `coord` on `listener` until `shutdown` resolves, ticking leases and rounds
/// every 250 ms.
pub async fn serve(
    listener: tokio::net::TcpListener,
    coord: Shared,
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
    // Connect info: `/v1/probe` dials back the caller's own address only.
    let app = router(coord).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    tick.abort();
    result
}

/// A coordinator serving on its own thread and runtime (for the CLI and the demo).
pub struct Running {
    /// The bound address.
    pub addr: std::net::SocketAddr,
    /// The coordinator, for status in-process.
    pub coord: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Running({})", self.addr)
    }
}

impl Running {
    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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

/// Binds `listen` and serves `coord` on a new thread.
pub fn spawn(listen: std::net::SocketAddr, coord: Coordinator) -> crate::Result<Running> {
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
    let thread = std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || {
            rt.block_on(serve(listener, shared, async {
                let _ = rx.await;
            }))
        })
        .map_err(|e| NodeError::Network(e.to_string()))?;
    Ok(Running {
        addr,
        coord,
        stop: Some(tx),
        thread: Some(thread),
    })
}
