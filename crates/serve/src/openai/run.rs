//! One choice on the route: its bytes go through the choice's [`TextStream`] as they
//! arrive, and, when streaming, out to the client as soon as they are final text.
//!
//! The AR pipeline samples a byte per traversal, so its bytes are streamed one by one and
//! a matched stop sequence (or a client that went away) ends the generation early. A
//! diffusion traversal returns the whole output at once: the stages' partial sequences
//! are handed server to server and never come back to the client, and they are partly
//! masked, not a prefix of the answer, so there is nothing earlier to stream.
use std::convert::Infallible;
use std::time::Instant;

use axum::response::sse::Event;
use tokio::sync::mpsc;

use blocktrain_protocol::frame::ByteLogprobs;

use super::error::ApiError;
use super::output::{Output, Piece};
use super::Gateway;
use crate::client::{self, Request};

/// Where a streamed choice's text goes: the SSE channel, formatted by `event`.
pub struct Live<'a> {
    /// The response's events.
    pub tx: &'a mpsc::Sender<Result<Event, Infallible>>,
    /// Formats one piece of the choice's text (and its bytes' scores) as a chunk.
    pub event: &'a (dyn Fn(Piece) -> Event + Sync),
}

impl Live<'_> {
    /// Sends `piece` (if it has text); false when the client has gone.
    async fn send(&self, piece: Piece) -> bool {
        piece.text.is_empty() || self.tx.send(Ok((self.event)(piece))).await.is_ok()
    }
}

/// Generates choice `req` into `text`, with `logprobs` alternatives per byte when
/// asked for (AR only: the request check refuses them for diffusion); returns the bytes
/// the route generated.
pub async fn run_choice(
    g: &Gateway,
    req: Request,
    logprobs: Option<u32>,
    text: &mut Output,
    live: Option<Live<'_>>,
) -> Result<usize, ApiError> {
    let started = Instant::now();
    let family = g.plan().family.clone();
    if logprobs.is_some() && family != "ar" {
        // The route was checked as AR; a registry refresh has since replaced it.
        return Err(ApiError::unsupported(
            "logprobs",
            format!("logprobs are not available: the route now serves a {family} model"),
        ));
    }
    let result = if family == "ar" {
        let (bytes_tx, mut bytes_rx) = mpsc::unbounded_channel::<(u8, Option<ByteLogprobs>)>();
        let generation = async move {
            // The callback ends the generation once the reader below has stopped.
            let mut on_byte =
                move |b, lp: Option<&ByteLogprobs>| bytes_tx.send((b, lp.cloned())).is_ok();
            client::generate_ar_scored(&g.plan(), &req, logprobs, &g.limits, &mut on_byte).await
        };
        let text = &mut *text;
        let live = live.as_ref();
        let reader = async move {
            while let Some((b, lp)) = bytes_rx.recv().await {
                let go_on = text.push(b, lp.as_ref());
                if let Some(live) = live {
                    if !live.send(text.ready()).await {
                        break;
                    }
                }
                if !go_on {
                    break;
                }
            }
            // `bytes_rx` is dropped here: the next byte's send fails and stops the route.
        };
        tokio::join!(generation, reader).0
    } else {
        let result = client::generate(&g.plan(), &req, &g.limits).await;
        if let Ok(out) = &result {
            for &b in &out.output {
                if !text.push(b, None) {
                    break;
                }
            }
            if let Some(live) = &live {
                live.send(text.ready()).await;
            }
        }
        result
    };
    let out = result.map_err(ApiError::from_serve)?;
    g.metrics.generation(
        out.output.len(),
        out.traversals,
        started.elapsed().as_secs_f64(),
        text.finish_reason(),
    );
    Ok(out.output.len())
}
