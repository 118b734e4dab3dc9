//! `POST /v1/completions` and `POST /v1/chat/completions`: check the body, take a
//! generation slot, run every choice in turn (prompt-major), answer in one JSON object
//! or, with `stream`, as server-sent events ([`super::stream`]).
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::OwnedSemaphorePermit;

use super::error::{ApiError, JsonBody};
use super::output::Output;
use super::request::{check, Body, Endpoint, Job};
use super::run::run_choice;
use super::Gateway;

/// `POST /v1/completions`.
pub async fn completions(
    State(g): State<Arc<Gateway>>,
    JsonBody(body): JsonBody<Body>,
) -> Response {
    answer(g, body, Endpoint::Completions)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/chat/completions`.
pub async fn chat(State(g): State<Arc<Gateway>>, JsonBody(body): JsonBody<Body>) -> Response {
    answer(g, body, Endpoint::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// What every chunk and response of one request shares.
pub struct Head {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// `cmpl-...` or `chatcmpl-...`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
}

impl Head {
    /// An object of `kind` with these fields and `rest`.
    pub fn object(&self, kind: &str, choices: Value, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
}

/// OpenAI's `usage`, in bytes.
pub fn usage(job: &Job, completion: usize) -> Value {
    let prompt: usize = job.prompts.iter().map(Vec::len).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

async fn answer(g: Arc<Gateway>, body: Body, endpoint: Endpoint) -> Result<Response, ApiError> {
    let plan = g.plan();
    let job = check(body, endpoint, &plan, g.default_steps)?;
    let slot = take_slot(&g)?;
    let prefix = match endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    };
    let head = Head {
        endpoint,
        id: format!("{prefix}-{:016x}", rand::random::<u64>()),
        created: crate::now_ms() / 1000,
        model: plan.model_id.clone(),
    };
    if job.stream {
        return Ok(super::stream::respond(g, job, head, slot));
    }
    let mut choices = Vec::with_capacity(job.choices());
    let mut completion = 0;
    for index in 0..job.choices() {
        let mut out = Output::new(job.stops.clone(), job.logprobs.is_some());
        completion += run_choice(&g, job.request(index), job.logprobs, &mut out, None).await?;
        let piece = out.finish();
        let logprobs = piece.scored.map_or(Value::Null, |s| s.render(endpoint));
        let mut content = piece.text;
        let finish = out.finish_reason();
        choices.push(match endpoint {
            Endpoint::Completions => {
                if job.echo {
                    let prompt = &job.prompts[index / job.n as usize];
                    content.insert_str(0, &String::from_utf8_lossy(prompt));
                }
                json!({"text": content, "index": index, "logprobs": logprobs, "finish_reason": finish})
            }
            Endpoint::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": content},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        });
    }
    drop(slot);
    let kind = match endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion",
    };
    let body = head.object(kind, Value::Array(choices), Some(usage(&job, completion)));
    Ok(Json(body).into_response())
}

/// A generation slot, or 503 when `--max-concurrent` requests are generating already
/// (refused at once: a queue would only hide the wait from the client).
fn take_slot(g: &Gateway) -> Result<OwnedSemaphorePermit, ApiError> {
    g.slots.clone().try_acquire_owned().map_err(|_| ApiError {
        code: Some("server_overloaded"),
        ..ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!(
                "the gateway is already generating for {} requests, its --max-concurrent limit: retry shortly",
                g.max_concurrent
            ),
        )
    })
}
