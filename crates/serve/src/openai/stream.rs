//! `stream: true`: server-sent events as OpenAI sends them, `data: {chunk}\n\n` per
//! piece and `data: [DONE]\n\n` at the end.
//!
//! Choices run one after another; each one's chunks carry its `index`. Completions send
//! `text` pieces, then an empty piece with the `finish_reason`; chat sends a first
//! `delta` with the role, `content` deltas, then an empty delta with the reason; with
//! `logprobs`, each piece carries those of its own bytes ([`super::logprobs`]). With
//! `stream_options.include_usage` a last chunk has no choices and the `usage`. A failure
//! mid-stream is sent as an `{"error": ...}` event (the OpenAI clients raise it) and the
//! stream ends without `[DONE]`.
use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::complete::{usage, Head};
use super::output::{Output, Piece};
use super::request::{Endpoint, Job};
use super::run::{run_choice, Live};
use super::Gateway;

/// Events buffered towards a slow reader before the generation waits for it.
const BUFFERED_EVENTS: usize = 32;

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

impl Head {
    fn chunk_kind(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
        }
    }

    /// A chunk of choice `index`: `text` and its bytes' `logprobs` (or null) and, on its
    /// last chunk, its finish reason.
    fn piece(
        &self,
        index: usize,
        text: Option<&str>,
        logprobs: Value,
        finish: Option<&str>,
    ) -> Event {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "text": text.unwrap_or(""), "index": index, "logprobs": logprobs, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let delta = text.map_or(json!({}), |t| json!({"content": t}));
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        data(&self.object(self.chunk_kind(), json!([choice]), None))
    }

    /// A chunk of choice `index` with a piece of its text.
    fn chunk(&self, index: usize, p: Piece) -> Event {
        let logprobs = p.scored.map_or(Value::Null, |s| s.render(self.endpoint));
        self.piece(index, Some(&p.text), logprobs, None)
    }

    /// The chat's first chunk of a choice: the role.
    fn role(&self, index: usize) -> Event {
        let choice = json!({
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": null,
            "finish_reason": null,
        });
        data(&self.object(self.chunk_kind(), json!([choice]), None))
    }
}

/// The SSE response; the generation runs in its own task, holding `slot` until done.
pub fn respond(g: Arc<Gateway>, job: Job, head: Head, slot: OwnedSemaphorePermit) -> Response {
    let (tx, mut rx) = mpsc::channel::<Result<Event, Infallible>>(BUFFERED_EVENTS);
    tokio::spawn(async move {
        let _slot = slot;
        produce(&g, &job, &head, &tx).await;
    });
    let events = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    // Comments every 15 s keep proxies from closing a stream that waits on a long
    // traversal (SSE readers skip them).
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Sends every choice's events; returns early when the client has gone.
async fn produce(
    g: &Gateway,
    job: &Job,
    head: &Head,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
) {
    let send = |e: Event| async move { tx.send(Ok(e)).await.is_ok() };
    let mut completion = 0;
    for index in 0..job.choices() {
        let first = match head.endpoint {
            Endpoint::Chat => Some(head.role(index)),
            Endpoint::Completions if job.echo => {
                let prompt = &job.prompts[index / job.n as usize];
                let echo = String::from_utf8_lossy(prompt);
                Some(head.piece(index, Some(&echo), Value::Null, None))
            }
            Endpoint::Completions => None,
        };
        if let Some(e) = first {
            if !send(e).await {
                return;
            }
        }
        let mut text = Output::new(job.stops.clone(), job.logprobs.is_some());
        let event = |p: Piece| head.chunk(index, p);
        let live = Live { tx, event: &event };
        let req = job.request(index);
        match run_choice(g, req, job.logprobs, &mut text, Some(live)).await {
            Ok(n) => completion += n,
            Err(e) => {
                send(data(&e.body())).await;
                return;
            }
        }
        if tx.is_closed() {
            return;
        }
        let rest = text.finish();
        if !rest.text.is_empty() && !send(head.chunk(index, rest)).await {
            return;
        }
        let last = head.piece(index, None, Value::Null, Some(text.finish_reason()));
        if !send(last).await {
            return;
        }
    }
    if job.include_usage {
        let u = head.object(head.chunk_kind(), json!([]), Some(usage(job, completion)));
        if !send(data(&u)).await {
            return;
        }
    }
    send(Event::default().data("[DONE]")).await;
}
