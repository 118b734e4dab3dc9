//! The public read routes: status, held-out history, and the ledger (tree head,
//! receipts, inclusion and consistency proofs).
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::Json;
use blocktrain_protocol::receipt::ReceiptProof;

use super::{with, AppState, Reply};
use crate::ledger::Ledger;
use crate::NodeError;

/// `GET /v1/history`: held-out loss per block and version (the dashboard's chart).
pub(super) async fn history(State(s): State<AppState>) -> Reply<impl IntoResponse> {
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
pub(super) async fn ledger_head(State(s): State<AppState>) -> Reply<impl IntoResponse> {
    let head = with(&s.coord, |co| Ledger::latest_head(co.conn())).await?;
    head.map(Json)
        .ok_or_else(|| NodeError::NotFound("the ledger is empty".into()))
}

#[derive(serde::Deserialize)]
pub(super) struct ReceiptsQuery {
    worker: Option<String>,
    recent: Option<usize>,
}

/// `GET /v1/ledger/receipts?worker=KEY` (all of that worker's) or `?recent=N` (newest
/// first, default 20): one summary line per receipt, with its index.
pub(super) async fn ledger_receipts(
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

pub(super) async fn status(State(s): State<AppState>) -> Reply<impl IntoResponse> {
    Ok(Json(with(&s.coord, |co| co.status()).await?))
}
