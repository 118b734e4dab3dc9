//! The workers' routes: register, probe, run, work, heartbeat, checkpoints, updates.
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use blocktrain_protocol::receipt::Claim;
use blocktrain_protocol::wire::{is_hex64, HeartbeatReply, RegisterRequest, WorkReply, WorkerInfo};
use tower::ServiceExt;

use super::auth::{auth_headers, authenticate, header, signed_json};
use super::{with, AppState, Reply, UPLOAD_TIMEOUT};
use crate::coordinator::{lock, short, Admitted};
use crate::core::{Beat, Work};
use crate::{now_ms, NodeError};

pub(super) async fn register(
    State(s): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Reply<impl IntoResponse> {
    let (key, req): (_, RegisterRequest) = signed_json(&s.gate, &uri, &headers, &body, "register")?;
    let info = with(&s.coord, move |co| co.register(&key, &req, now_ms())).await?;
    s.synced().await?;
    Ok(Json(info))
}

/// `POST /v1/probe` (signed, body `{"port": P}`): can this coordinator open a TCP
/// connection to the caller's own IP at port P, the port it declares it serves on?
/// Only the address the request came from is dialled, so the endpoint cannot be used to
/// scan anyone else; never a loopback or unspecified address unless this coordinator
/// itself listens on loopback (behind a local proxy every caller looks like loopback,
/// and the coordinator's own host must not be scanned for them); never a port below
/// 1024 (no worker serves there, and system services do); at most one probe per 10 s
/// per address and per key.
pub(super) async fn probe(
    State(s): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Reply<impl IntoResponse> {
    #[derive(serde::Deserialize)]
    struct ProbeRequest {
        port: u16,
    }
    let (key, req): (_, ProbeRequest) = signed_json(&s.gate, &uri, &headers, &body, "probe")?;
    // An IPv4 peer of a dual-stack listener shows as ::ffff:a.b.c.d: look through it.
    let ip = peer.ip().to_canonical();
    let local_only = s.bound.is_some_and(|b| b.ip().is_loopback());
    if (ip.is_loopback() || ip.is_unspecified()) && !local_only {
        return Err(NodeError::Forbidden(
            "this coordinator does not probe loopback addresses (it is not on loopback itself)"
                .into(),
        ));
    }
    if req.port < 1024 {
        return Err(NodeError::Rejected(format!(
            "port {} is below 1024: declare the unprivileged port this node serves on",
            req.port
        )));
    }
    s.gate.limit_probe(&ip.to_string())?;
    s.gate.limit_probe(&key)?;
    let target = std::net::SocketAddr::new(ip, req.port);
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

pub(super) async fn run_info(
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

pub(super) async fn work(
    State(s): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Reply<impl IntoResponse> {
    let (key, info): (_, WorkerInfo) = signed_json(&s.gate, &uri, &headers, &body, "work")?;
    // What writes nothing (a wait, the lease already held, done, a refusal) is answered
    // from the core alone: no SQLite, and no wait for the coordinator's lock, which a
    // merge or a decision may hold. Only a new lease goes to the coordinator, which
    // journals it before the reply.
    let fast = {
        let mut core = lock(&s.core);
        match core.work(&key, &info, now_ms(), false) {
            Ok(Work::Lease(lease, _)) => Some(Ok(WorkReply::Lease(core.lease_reply(&lease)))),
            Ok(Work::Wait) => Some(Ok(WorkReply::Wait { retry_ms: 1000 })),
            // The last commit's receipts may still be on their way to the journal (the
            // core learns of a commit first): "done" comes from the coordinator.
            Ok(Work::Done | Work::WouldIssue) => None,
            Err(e) => Some(Err(e)),
        }
    };
    if let Some(reply) = fast {
        let reply = reply?;
        // The held lease's own reply waited for its flush; a retry waits too, so that
        // no worker trains on a lease a power loss could take back.
        if matches!(reply, WorkReply::Lease(_)) {
            s.synced().await?;
        }
        return Ok(Json(reply));
    }
    let (reply, status) = with(&s.coord, move |co| {
        let reply = co.request_work(&key, &info, now_ms())?;
        // A worker told the run is done may stop, and whoever watches it read the
        // status next: the snapshot shows the final versions before the reply.
        let status = match reply {
            WorkReply::Done => Some(co.status()?),
            _ => None,
        };
        Ok((reply, status))
    })
    .await?;
    if let Some(status) = status {
        super::store_snapshot(status, &s.snapshot);
    }
    s.synced().await?;
    Ok(Json(reply))
}

pub(super) async fn heartbeat(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    uri: Uri,
    headers: HeaderMap,
) -> Reply<impl IntoResponse> {
    let key = authenticate(&s.gate, &Method::POST, &uri, &headers, b"")?;
    // A renewal is soft state (journaled at the next tick; a restart renews every open
    // lease anyway): answered from the core, never waiting for the coordinator's lock.
    let beat = lock(&s.core).heartbeat(&key, id, now_ms())?;
    let still_wanted = match beat {
        Beat::Wanted(wanted) => wanted,
        // Of a closed round: the journal says whether it exists and whose it is.
        Beat::NotCurrent => with(&s.coord, move |co| co.heartbeat(&key, id, now_ms())).await?,
    };
    Ok(Json(HeartbeatReply { still_wanted }))
}

pub(super) async fn blob(
    State(s): State<AppState>,
    Path(hash): Path<String>,
    req: Request,
) -> Reply<Response> {
    if !is_hex64(&hash) {
        return Err(NodeError::NotFound(
            "checkpoints are named by their blake3: 64 lowercase hex digits".into(),
        ));
    }
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
pub(super) struct UpdateQuery {
    loss: Option<f64>,
}

/// Uploads are checked in order of cost, and nothing is written, counted or locked
/// before the signature over the exact bytes holds: the headers' form, the declared
/// size, the body (bounded, within [`UPLOAD_TIMEOUT`]), the signature, nonce and rate;
/// then the coordinator admits it under its lock (lease, claim, replays), vets it on a
/// bounded pool without the lock (decode, norms, screen, spot check), and decides
/// under the lock again.
pub(super) async fn update(
    State(s): State<AppState>,
    Path(lease): Path<i64>,
    Query(q): Query<UpdateQuery>,
    req: Request,
) -> Reply<Json<blocktrain_protocol::wire::UpdateReply>> {
    let (parts, body) = req.into_parts();
    auth_headers(&parts.headers)?;
    let limit = s.gate.max_update;
    let declared: Option<u64> =
        header(&parts.headers, "content-length").and_then(|v| v.parse().ok());
    if let Some(n) = declared.filter(|&n| n as usize > limit) {
        return Err(NodeError::TooLarge(format!(
            "update of {n} bytes exceeds the limit of {limit}; nothing stored"
        )));
    }
    // Before its signature can be checked a body must be read whole: bound how many are
    // buffered at once, so unauthenticated senders cannot fill memory.
    let _body_slot = s.upload_bodies.clone().try_acquire_owned().map_err(|_| {
        NodeError::Busy("too many uploads arriving at once; nothing stored, retry shortly".into())
    })?;
    let body = match tokio::time::timeout(UPLOAD_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return Err(NodeError::Rejected(format!(
                "upload interrupted or over {limit} bytes: {e}; nothing stored"
            )))
        }
        Err(_) => {
            return Err(NodeError::Rejected(format!(
                "upload took longer than {} s; nothing stored",
                UPLOAD_TIMEOUT.as_secs()
            )))
        }
    };
    let key = authenticate(&s.gate, &Method::POST, &parts.uri, &parts.headers, &body)?;
    let claim = claim_headers(&parts.headers);
    let admitted = with(&s.coord, move |co| {
        co.admit_update(&key, lease, body.to_vec(), q.loss, claim, now_ms())
    })
    .await;
    if admitted.is_err() {
        // A refusal at admission is recorded (once per lease): on disk before the reply.
        s.synced().await?;
    }
    let admitted = admitted?;
    drop(_body_slot);
    let job = match admitted {
        Admitted::Replayed(reply) => {
            s.synced().await?;
            return Ok(Json(reply));
        }
        Admitted::Vet(job) => job,
    };
    let (lease_id, block) = (job.lease_id(), job.block());
    // Vetting and the decision run in a task of their own, holding their pool slot:
    // a client that hangs up does not free the slot while the compute goes on, and an
    // admitted upload is always decided (the lease is marked as vetting until then).
    let st = s.clone();
    let decided = tokio::spawn(async move {
        let slot = st
            .vetting
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| NodeError::Busy("the coordinator is shutting down".into()))?;
        let vetted = tokio::task::spawn_blocking(move || {
            let vetted = job.run();
            drop(slot);
            vetted
        })
        .await;
        let vetted = match vetted {
            Ok(v) => v,
            Err(e) => {
                // The vetting panicked: forget it, so the lease can take an upload again.
                with(&st.coord, move |co| {
                    co.abandon_vetting(lease_id);
                    Ok(())
                })
                .await?;
                return Err(NodeError::Network(format!("vetting task failed: {e}")));
            }
        };
        let reply = with(&st.coord, move |co| co.decide(vetted, now_ms())).await;
        st.synced().await?;
        let mut reply = reply?;
        // This upload may have completed the round's quorum: merge it now (off the lock),
        // so the reply names the version it went into.
        if let Err(e) = super::close_round(&st, block).await {
            tracing::error!("block {}: round not closed: {e}", block + 1);
        }
        reply.block_version = lock(&st.core).version(block);
        Ok::<_, NodeError>(reply)
    });
    let reply = match decided.await {
        Ok(reply) => reply?,
        Err(e) => {
            let _ = with(&s.coord, move |co| {
                co.abandon_vetting(lease_id);
                Ok(())
            })
            .await;
            return Err(NodeError::Network(format!("decision task failed: {e}")));
        }
    };
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
