//! One connection: greets, reads its frames, admits and dispatches them, writes replies
//! and keepalives.
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blocktrain_protocol::frame::{ErrorCode, Greeting, HopError, Message, ServerInfo};
use tokio::net::TcpStream;
use tokio::sync::{watch, Mutex as AsyncMutex};
use tokio::time::timeout;

use super::ar::{ar_step, ArSession};
use super::denoise::denoise;
use super::gate::ConnSlot;
use super::{Shared, Upstream};
use crate::framed::{read_message_reserving, write_message, ReadError};
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

/// Answers a connection over a limit with the refusal instead of a greeting.
pub(super) async fn refuse(stream: TcpStream, code: ErrorCode, why: String, shared: Arc<Shared>) {
    let (_rd, wr) = stream.into_split();
    let up: Upstream = Arc::new(AsyncMutex::new(wr));
    let reply = error(0, code, why, &shared);
    send_up(&up, &reply, Duration::from_secs(1)).await;
}

/// Who is on the other end of a connection, once known.
struct Peer {
    addr: SocketAddr,
    /// The key its `Hello` proved, if any.
    key: Option<String>,
}

impl Peer {
    /// Rates are kept per key for keys on the allowlist (which cannot be minted), else
    /// per IP address (an IPv6 client per /64, what one host is usually given): a
    /// self-signed key is free, so keying rates by it would give every fresh key a fresh
    /// budget and let one client fill the rate table.
    fn client(&self, allow: Option<&std::collections::HashSet<String>>) -> String {
        if let (Some(key), Some(allow)) = (&self.key, allow) {
            if allow.contains(key) {
                return key.clone();
            }
        }
        blocktrain_protocol::host_of(self.addr.ip())
    }
}

pub(super) async fn handle(
    stream: TcpStream,
    addr: SocketAddr,
    _slot: ConnSlot,
    shared: Arc<Shared>,
) {
    let (mut rd, wr) = stream.into_split();
    let up: Upstream = Arc::new(AsyncMutex::new(wr));
    let stall = shared.opts.limits.stall_timeout;
    let challenge = hex::encode(rand::random::<[u8; 16]>());
    let greeting = Greeting {
        info: info_now(&shared),
        key: shared.key.clone(),
        challenge: challenge.clone(),
        auth: shared.opts.auth.required(),
        idle_timeout_ms: shared.opts.idle_timeout.as_millis() as u64,
        connections: shared.accepted.load(Ordering::Relaxed),
    };
    if !send_up(&up, &Message::Greeting(greeting), stall).await {
        return;
    }
    let mut peer = Peer { addr, key: None };
    let mut session: Option<ArSession> = None;
    loop {
        // A frame's declared size is taken from the server's byte budget before its
        // payload is allocated, and held (`_buffered`) until its request is done.
        let read = timeout(
            shared.opts.idle_timeout,
            read_message_reserving(
                &mut rd,
                shared.opts.limits.max_frame,
                &shared.opts.frame_deadline,
                |len| shared.gate.budget().reserve(len),
            ),
        )
        .await;
        let (msg, _buffered) = match read {
            Err(_) | Ok(Err(ReadError::Closed)) | Ok(Err(ReadError::Io(_))) => return,
            Ok(Err(ReadError::Refused(why))) => {
                // Its payload was discarded: the connection is still in step.
                tracing::warn!(%addr, "refused: {why}");
                if !send_up(&up, &error(0, ErrorCode::Busy, why, &shared), stall).await {
                    return;
                }
                continue;
            }
            Ok(Err(ReadError::TooSlow(why))) => {
                tracing::warn!(%addr, "closing a slow connection: {why}");
                let reply = error(0, ErrorCode::BadRequest, why, &shared);
                send_up(&up, &reply, Duration::from_secs(1)).await;
                return;
            }
            Ok(Err(ReadError::Protocol(e))) => {
                tracing::warn!(%addr, "bad frame: {e}");
                let reply = error(0, ErrorCode::BadRequest, format!("bad frame: {e}"), &shared);
                send_up(&up, &reply, stall).await;
                return; // the stream may be out of step: close it
            }
            Ok(Ok(read)) => read,
        };
        if let Err((id, code, why)) = admit(&msg, &mut peer, &challenge, &shared) {
            tracing::warn!(%addr, "refused: {why}");
            send_up(&up, &error(id, code, why, &shared), stall).await;
            // A failed Hello or an unauthenticated request ends the connection; a
            // client over its rate may try again later on it.
            if code == ErrorCode::Unauthorized {
                return;
            }
            continue;
        }
        let ok = match msg {
            Message::Hello(_) => true,
            Message::Info => send_up(&up, &Message::ServerInfo(info_now(&shared)), stall).await,
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
                send_up(&up, &reply, stall).await;
                false
            }
        };
        if !ok {
            return;
        }
    }
}

fn info_now(shared: &Shared) -> ServerInfo {
    let mut info = shared.info.clone();
    info.served = shared.served.load(Ordering::Relaxed);
    info.busy_ms = shared.busy_us.load(Ordering::Relaxed) as f64 / 1e3;
    info.batches = shared.batcher.stats.batches.load(Ordering::Relaxed);
    info.batched = shared.batcher.stats.requests.load(Ordering::Relaxed);
    info
}

/// Whether this connection may have `msg` served: a `Hello` is checked (once per
/// connection), requests need one when the server requires it, and new requests (a
/// diffusion request, an AR session's first step) take from the client's rate.
fn admit(
    msg: &Message,
    peer: &mut Peer,
    challenge: &str,
    shared: &Shared,
) -> Result<(), (u64, ErrorCode, String)> {
    let unauthorized = |id, m: String| Err((id, ErrorCode::Unauthorized, m));
    let id = match msg {
        Message::Hello(hello) => {
            if peer.key.is_some() {
                return unauthorized(0, "this connection is already authenticated".into());
            }
            let key = shared
                .opts
                .auth
                .check(hello, challenge, &shared.key)
                .map_err(|m| (0, ErrorCode::Unauthorized, m))?;
            peer.key = Some(key);
            return Ok(());
        }
        Message::Denoise(m, _) | Message::Latent(m, ..) => m.request_id,
        Message::ArStep(m, _) => m.session,
        _ => return Ok(()),
    };
    if shared.opts.auth.required() && peer.key.is_none() {
        return unauthorized(
            id,
            "this server serves authenticated clients only: send a Hello signing the greeting's challenge first".into(),
        );
    }
    let new_request = !matches!(msg, Message::ArStep(m, _) if m.setup.is_none());
    if new_request {
        shared
            .gate
            .rate(&peer.client(shared.opts.auth.allow.as_ref()))
            .map_err(|(code, why)| (id, code, why))?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::Peer;

    #[test]
    fn rates_follow_allowlisted_keys_and_otherwise_the_address() {
        let peer = |addr: &str, key: Option<&str>| Peer {
            addr: addr.parse().unwrap(),
            key: key.map(str::to_string),
        };
        let allow: std::collections::HashSet<String> = ["good".to_string()].into();
        // A fresh self-signed key buys no budget of its own.
        assert_eq!(
            peer("10.0.0.1:5", Some("fresh")).client(Some(&allow)),
            "10.0.0.1"
        );
        assert_eq!(peer("10.0.0.1:5", Some("fresh")).client(None), "10.0.0.1");
        assert_eq!(
            peer("10.0.0.1:5", Some("good")).client(Some(&allow)),
            "good"
        );
        // One IPv6 host is a /64; a v4-mapped address is its IPv4 one.
        assert_eq!(
            peer("[2001:db8:1:2:aaaa::1]:5", None).client(None),
            peer("[2001:db8:1:2:bbbb::9]:5", None).client(None)
        );
        assert_eq!(peer("[::ffff:10.0.0.1]:5", None).client(None), "10.0.0.1");
    }
}
