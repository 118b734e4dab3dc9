//! An OpenAI-style `POST /v1/completions` entry point in front of a route, so existing
//! clients can call a BlockTrain model. Each request is one traversal of the block stack.
//!
//! Bytes are the model's tokens: `max_tokens` counts output bytes, `usage` counts bytes,
//! and output bytes that are not valid UTF-8 are replaced (U+FFFD) in `text`.
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use blocktrain_protocol::frame::Sampling;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::client::{generate, Plan, Request};
use crate::hop::HopLimits;

/// Output bytes when a request gives no `max_tokens`.
const DEFAULT_MAX_TOKENS: usize = 16;

/// The body of `POST /v1/completions` (the fields BlockTrain uses; others are ignored).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Model name (informational: the route serves one model).
    #[serde(default)]
    pub model: Option<String>,
    /// Prompt text.
    #[serde(default)]
    pub prompt: String,
    /// Output bytes.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Softmax temperature (0 means greedy).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Sampling seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// BlockTrain extension: keep the k most likely bytes.
    #[serde(default)]
    pub top_k: Option<u32>,
    /// BlockTrain extension: denoising steps per block.
    #[serde(default)]
    pub steps_per_block: Option<u32>,
}

/// One choice of a completion.
#[derive(Debug, Serialize, Deserialize)]
pub struct Choice {
    /// Generated text.
    pub text: String,
    /// Always 0 (one choice).
    pub index: u32,
    /// Always `length`: diffusion generates exactly `max_tokens` bytes.
    pub finish_reason: String,
}

/// The response body.
#[derive(Debug, Serialize, Deserialize)]
pub struct CompletionResponse {
    /// Request id.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model id the route serves.
    pub model: String,
    /// The single choice.
    pub choices: Vec<Choice>,
    /// Byte counts.
    pub usage: serde_json::Value,
}

struct Gateway {
    plan: Plan,
    limits: HopLimits,
    default_steps: u32,
}

/// The router: `POST /v1/completions`, `GET /v1/models`.
pub fn router(plan: Plan, limits: HopLimits, default_steps: u32) -> Router {
    let state = Arc::new(Gateway {
        plan,
        limits,
        default_steps,
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .with_state(state)
}

fn api_error(status: StatusCode, message: String) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error"}});
    (status, Json(body)).into_response()
}

async fn models(State(g): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    Json(
        json!({"object": "list", "data": [{"id": g.plan.model_id, "object": "model", "owned_by": "blocktrain"}]}),
    )
}

async fn completions(
    State(g): State<Arc<Gateway>>,
    Json(req): Json<CompletionRequest>,
) -> Response {
    let len = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let temperature = req.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return api_error(
            StatusCode::BAD_REQUEST,
            format!("temperature must be >= 0, got {temperature}"),
        );
    }
    // OpenAI's temperature 0 means greedy: the most likely byte.
    let (temperature, top_k) = if temperature == 0.0 {
        (1.0, 1)
    } else {
        (temperature, req.top_k.unwrap_or(0))
    };
    let request = Request {
        prompt: req.prompt.clone().into_bytes(),
        len,
        sampling: Sampling {
            steps_per_block: req.steps_per_block.unwrap_or(g.default_steps),
            temperature,
            top_k,
            heun: false,
        },
        seed: req.seed.unwrap_or_else(rand::random),
    };
    match generate(&g.plan, &request, &g.limits).await {
        Ok(out) => {
            let created = crate::now_ms() / 1000;
            let body = CompletionResponse {
                id: format!("cmpl-{:016x}", rand::random::<u64>()),
                object: "text_completion".into(),
                created,
                model: req.model.unwrap_or_else(|| g.plan.model_id.clone()),
                choices: vec![Choice {
                    text: String::from_utf8_lossy(&out.output).into_owned(),
                    index: 0,
                    finish_reason: "length".into(),
                }],
                usage: json!({
                    "prompt_tokens": request.prompt.len(),
                    "completion_tokens": out.output.len(),
                    "total_tokens": request.prompt.len() + out.output.len(),
                }),
            };
            Json(body).into_response()
        }
        Err(crate::ServeError::Config(m)) => api_error(StatusCode::BAD_REQUEST, m),
        Err(e) => api_error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}
