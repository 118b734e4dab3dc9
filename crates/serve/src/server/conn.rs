//! One connection: reads its frames, dispatches them, writes replies and keepalives.
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blocktrain_protocol::frame::{ErrorCode, HopError, Message};
use tokio::net::TcpStream;
use tokio::sync::{watch, Mutex as AsyncMutex};
use tokio::time::timeout;

use super::ar::{ar_step, ArSession};
use super::denoise::denoise;
use super::{Shared, Upstream};
use crate::framed::{read_message, write_message, ReadError};
/// Writes a frame upstream, giving up on a caller that stops reading (a full socket
/// buffer would otherwise hold this handler, and its KV cache, forever).
pub(super) async fn send_up(up: &Upstream, message: &Message, limit: Duration) -> bool {
    let write = async { write_message(&mut *up.lock().await, message).await };
    matches!(timeout(limit, write).await, Ok(Ok(_)))
}

pub(super) fn error(request_id: u64, code: ErrorCode, message: String, shared: &Shared) -> Message {
    // Keep errors readable: libtorch messages carry whole backtraces after the first line.
    let mut message = message.lines().next().unwrap_or("").to_string();
    if message.len() > 500 {
        let cut = (0..=500)
            .rev()
            .find(|&i| message.is_char_boundary(i))
            .unwrap_or(0);
        message.truncate(cut);
        message.push('…');
    }
    Message::Error(HopError {
        request_id,
        code,
        message,
        blocks: Some(shared.info.blocks),
    })
}

pub(super) async fn handle(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let (mut rd, wr) = stream.into_split();
    let up: Upstream = Arc::new(AsyncMutex::new(wr));
    let mut session: Option<ArSession> = None;
    loop {
        let read = timeout(
            shared.opts.idle_timeout,
            read_message(&mut rd, shared.opts.limits.max_frame),
        )
        .await;
        let msg = match read {
            Err(_) | Ok(Err(ReadError::Closed)) | Ok(Err(ReadError::Io(_))) => return,
            Ok(Err(ReadError::Protocol(e))) => {
                tracing::warn!(%peer, "bad frame: {e}");
                let reply = error(0, ErrorCode::BadRequest, format!("bad frame: {e}"), &shared);
                send_up(&up, &reply, shared.opts.limits.stall_timeout).await;
                return; // the stream may be out of step: close it
            }
            Ok(Ok(m)) => m,
        };
        let ok = match msg {
            Message::Info => {
                let mut info = shared.info.clone();
                info.served = shared.served.load(Ordering::Relaxed);
                send_up(
                    &up,
                    &Message::ServerInfo(info),
                    shared.opts.limits.stall_timeout,
                )
                .await
            }
            Message::Denoise(meta, tokens) => denoise(&up, meta, tokens, None, &shared).await,
            Message::Latent(meta, tokens, z) => denoise(&up, meta, tokens, Some(z), &shared).await,
            Message::ArStep(meta, payload) => {
                let s = session.get_or_insert_with(ArSession::default);
                ar_step(&up, s, meta, payload, &shared).await
            }
            other => {
                let m = format!(
                    "a block server does not accept {} frames",
                    crate::kind_name(&other)
                );
                let reply = error(0, ErrorCode::BadRequest, m, &shared);
                send_up(&up, &reply, shared.opts.limits.stall_timeout).await;
                false
            }
        };
        if !ok {
            return;
        }
    }
}

/// Sends keepalives upstream until stopped; stopping waits for a write in progress, so
/// the final frame never interleaves with one.
pub(super) struct Keepalive {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Keepalive {
    pub(super) fn start(up: &Upstream, every: Duration, write_limit: Duration) -> Keepalive {
        let (stop, mut stopped) = watch::channel(false);
        let up = up.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => return,
                }
                if !send_up(&up, &Message::Keepalive, write_limit).await {
                    return;
                }
            }
        });
        Keepalive { stop, task }
    }

    pub(super) async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}
