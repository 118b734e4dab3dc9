//! `GET /v1/models`, `GET /v1/models/{id}`, `GET /health` and `GET /metrics`.
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::Gateway;
use crate::client::server_info;
use crate::hop::HopLimits;

/// A health answer is reused this long, so clients polling `/health` do not make the
/// gateway dial every server at their rate.
const HEALTH_TTL: Duration = Duration::from_secs(2);

/// The last health answer and when it was made.
pub type HealthCache = tokio::sync::Mutex<Option<(Instant, StatusCode, Value)>>;

fn model_object(g: &Gateway) -> Value {
    json!({
        "id": g.plan().model_id,
        "object": "model",
        "created": g.started_s,
        "owned_by": "blocktrain",
    })
}

/// `GET /v1/models`: the one model the route serves.
pub async fn models(State(g): State<Arc<Gateway>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&g)]}))
}

/// `GET /v1/models/{id}`: that model, or 404 `model_not_found`.
pub async fn model(State(g): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    if id == g.plan().model_id {
        Json(model_object(&g)).into_response()
    } else {
        ApiError::model_not_found(&id).into_response()
    }
}

/// `GET /health`: 200 when every stage has a replica that answers as the route expects
/// (same model, same blocks), else 503; the body says which stages do. Replica addresses
/// are not shown (they are the operator's, and may be private).
pub async fn health(State(g): State<Arc<Gateway>>) -> Response {
    let mut cache = g.health.lock().await;
    if let Some((at, status, body)) = cache.as_ref() {
        if at.elapsed() < HEALTH_TTL {
            return (*status, Json(body.clone())).into_response();
        }
    }
    // One route for the whole check: a refresh may swap it meanwhile.
    let plan = g.plan();
    let limits = HopLimits {
        connect_timeout: Duration::from_secs(1),
        stall_timeout: Duration::from_secs(2),
        ..g.limits.clone()
    };
    // Every replica is asked at once, so one dead server costs its timeout once.
    let mut asks = tokio::task::JoinSet::new();
    for (i, stage) in plan.stages.iter().enumerate() {
        for addr in &stage.replicas {
            let (addr, limits, stage) = (addr.clone(), limits.clone(), stage.clone());
            let model = plan.model_id.clone();
            asks.spawn(async move {
                let info = server_info(&addr, &limits).await;
                (
                    i,
                    info.is_ok_and(|i| i.model_id == model && i.blocks == stage.blocks),
                )
            });
        }
    }
    let mut answering = vec![0usize; plan.stages.len()];
    while let Some(done) = asks.join_next().await {
        if let Ok((i, true)) = done {
            answering[i] += 1;
        }
    }
    let all_ok = answering.iter().all(|&n| n > 0);
    let stages: Vec<Value> = plan
        .stages
        .iter()
        .zip(&answering)
        .map(|(stage, n)| {
            json!({
                "blocks": stage.blocks.to_string(),
                "replicas": stage.replicas.len(),
                "answering": n,
            })
        })
        .collect();
    let in_flight = g.max_concurrent - g.slots.available_permits();
    let body = json!({
        "ok": all_ok,
        "model": plan.model_id,
        "family": plan.family,
        "route_reachable": all_ok,
        "stages": stages,
        "generations_in_flight": in_flight,
        "max_concurrent": g.max_concurrent,
    });
    let status = if all_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    *cache = Some((Instant::now(), status, body.clone()));
    (status, Json(body)).into_response()
}

/// `GET /metrics`.
pub async fn metrics(State(g): State<Arc<Gateway>>) -> Response {
    let in_flight = g.max_concurrent - g.slots.available_permits();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        g.metrics.render(in_flight, g.max_concurrent),
    )
        .into_response()
}
