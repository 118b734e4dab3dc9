//! The public read routes: status, held-out history, and the ledger (tree head,
//! receipts, inclusion and consistency proofs). They are unauthenticated, so each is
//! rate-limited per address and bounded: status comes from the ticker's snapshot, lists
//! come in pages from a reader connection of their own, and only the Merkle proofs
//! (O(log n) on the current log) take the coordinator's lock.
use axum::extract::{Path, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use blocktrain_protocol::receipt::ReceiptProof;
use blocktrain_protocol::wire::is_hex64;

use super::{with, AppState, Reply};
use crate::ledger::{Ledger, Page};
use crate::NodeError;

/// Least time between two proofs to an older log size (each rebuilds a prefix).
const PREFIX_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Receipts per page, by default and at most.
const PAGE: (usize, usize) = (100, 1000);

/// The per-address rate of unauthenticated reads (no address known: in-process use).
pub(super) async fn limit_reads(
    State(s): State<AppState>,
    req: Request,
    next: Next,
) -> Reply<Response> {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    if let Some(ip) = peer {
        s.gate.limit_peer(&ip)?;
    }
    Ok(next.run(req).await)
}

/// Runs `f` on the reader connection on a blocking thread (never the coordinator's lock).
async fn read<T: Send + 'static>(
    s: &AppState,
    f: impl FnOnce(&rusqlite::Connection) -> Reply<T> + Send + 'static,
) -> Reply<T> {
    let reader = s.reader.clone();
    tokio::task::spawn_blocking(move || {
        let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    })
    .await
    .map_err(|e| NodeError::Network(format!("read task failed: {e}")))?
}

/// `GET /v1/history`: held-out loss per block and version (the dashboard's chart).
pub(super) async fn history(State(s): State<AppState>) -> Reply<impl IntoResponse> {
    let blocks = with(&s.coord, |co| Ok(co.config().blocks)).await?;
    let h = read(&s, move |conn| {
        (0..blocks)
            .map(|b| crate::store::version_losses(conn, b))
            .collect::<Reply<Vec<_>>>()
    })
    .await?;
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
pub(super) async fn ledger_head(State(s): State<AppState>) -> Reply<impl IntoResponse> {
    let head = read(&s, Ledger::latest_head).await?;
    head.map(Json)
        .ok_or_else(|| NodeError::NotFound("the ledger is empty".into()))
}

#[derive(serde::Deserialize)]
pub(super) struct ReceiptsQuery {
    worker: Option<String>,
    /// Newest first: this many (the page size).
    recent: Option<usize>,
    /// Oldest first, after this index (a worker's audit walks its receipts this way).
    after: Option<u64>,
    /// Newest first, before this index.
    before: Option<u64>,
    /// Page size.
    limit: Option<usize>,
}

/// `GET /v1/ledger/receipts`: one summary line per receipt, with its index, one page at
/// a time. `?worker=KEY` gives that worker's oldest first (`&after=I` continues), else
/// the newest first (`?recent=N`, `&before=I` continues). `next` is the cursor of the
/// next page, null at the end.
pub(super) async fn ledger_receipts(
    State(s): State<AppState>,
    Query(q): Query<ReceiptsQuery>,
) -> Reply<impl IntoResponse> {
    if let Some(w) = &q.worker {
        if !is_hex64(w) {
            return Err(NodeError::Rejected(
                "worker must be a public key of 64 lowercase hex digits".into(),
            ));
        }
    }
    let limit = q.limit.or(q.recent).unwrap_or(PAGE.0).clamp(1, PAGE.1);
    let from = match (&q.worker, q.before) {
        (_, Some(b)) => Page::Before(Some(b)),
        (Some(_), None) => Page::After(q.after),
        (None, None) if q.after.is_some() => Page::After(q.after),
        (None, None) => Page::Before(None),
    };
    let worker = q.worker.clone();
    let rows = read(&s, move |conn| {
        Ledger::receipts_page(conn, worker.as_deref(), from, limit)
    })
    .await?;
    let next = match (rows.len() == limit, rows.last()) {
        (true, Some((i, _))) => Some(*i),
        _ => None,
    };
    let receipts: Vec<_> = rows
        .iter()
        .map(|(i, r)| {
            serde_json::json!({
                "index": i, "worker": r.claim.worker, "block": r.claim.block,
                "base_version": r.claim.base_version, "steps": r.claim.steps,
                "accepted": r.decision.accepted, "reason": r.decision.reason,
                "resulting_version": r.decision.resulting_version,
                "staleness": r.decision.staleness,
                "heldout_before": r.decision.heldout_before,
                "heldout_after": r.decision.heldout_after,
                "time_ms": r.decision.time_ms, "worker_signed": r.claim_sig.is_some(),
            })
        })
        .collect();
    Ok(Json(
        serde_json::json!({ "receipts": receipts, "next": next }),
    ))
}

/// `GET /v1/ledger/receipts/{index}`: the receipt, the latest signed tree head and the
/// inclusion proof against it (`blocktrain ledger check-proof` reads this JSON).
pub(super) async fn ledger_receipt(
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
pub(super) struct ConsistencyQuery {
    from: u64,
    to: Option<u64>,
}

/// `GET /v1/ledger/consistency?from=A[&to=B]`: proof that the log of size B (default:
/// the latest head) extends the log of size A.
pub(super) async fn ledger_consistency(
    State(s): State<AppState>,
    Query(q): Query<ConsistencyQuery>,
) -> Reply<impl IntoResponse> {
    let prefix_gate = s.prefix_proofs.clone();
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
        // A proof to an older size rebuilds that prefix of the tree (linear work under
        // the lock): only to sizes the coordinator signed a head for, and at most one
        // such proof a second for everyone together (a worker's audit asks for one).
        if to != co.ledger().len() {
            if Ledger::head(co.conn(), to)?.is_none() {
                return Err(NodeError::NotFound(format!(
                    "no signed tree head of size {to}"
                )));
            }
            let mut last = prefix_gate.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t: std::time::Instant| t.elapsed() < PREFIX_EVERY) {
                return Err(NodeError::Busy(
                    "proofs to older log sizes are served one a second; try again".into(),
                ));
            }
            *last = Some(std::time::Instant::now());
        }
        co.ledger().prove_consistency(q.from, to)
    })
    .await?;
    Ok(Json(proof))
}

/// `GET /v1/status`: the ticker's snapshot (computed under the lock only before the
/// first tick).
pub(super) async fn status(State(s): State<AppState>) -> Reply<impl IntoResponse> {
    let snap = snapshot(&s).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        snap.1.clone(),
    ))
}

/// The latest status snapshot, and its JSON.
pub(super) async fn snapshot(
    s: &AppState,
) -> Reply<std::sync::Arc<(crate::coordinator::Status, axum::body::Bytes)>> {
    let cached = s.snapshot.read().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(snap) = cached {
        return Ok(snap);
    }
    let status = with(&s.coord, |co| co.status()).await?;
    super::store_snapshot(status, &s.snapshot);
    let snap = s.snapshot.read().unwrap_or_else(|p| p.into_inner()).clone();
    snap.ok_or_else(|| NodeError::Network("status not available yet".into()))
}
