//! The block server: accepts frames over TCP, runs its blocks, forwards downstream.
//!
//! A diffusion request arrives as one `Denoise` frame (masked family) or `Latent` frame
//! (embedding family, below the top stage). The server checks it (model, blocks,
//! sizes), runs its blocks, and either answers with the `Result` (last stage) or sends
//! the partially unmasked bytes, or the latent, to the next stage ([`hop::call_stage`]:
//! its replicas in turn) and relays that stage's answer back. Every computed pass is
//! counted (`ServerInfo::served`), so traversals are measured by the servers. While it works or waits it
//! sends `Keepalive` frames upstream every `keepalive`, so its caller can tell slow
//! from stalled.
//!
//! An AR session is one connection: each `ArStep` frame runs this stage's layers
//! against the session's KV cache and goes on over a persistent connection to the next
//! stage; the last stage samples the byte and the `ArOutput` travels back.
//!
//! Compute is serialised (one request's blocks at a time) and runs on the blocking
//! pool; a panic in it becomes an `Internal` error for that request, never a dead
//! server. A bad frame gets an error reply and the connection is closed.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blocktrain_model::transformer::KvCache;
use blocktrain_protocol::frame::{
    encode_tokens, ArOutput, ArPayload, ArSetup, ArStepMeta, DenoiseMeta, ErrorCode, HopError,
    HopStat, LatentState, Message, ResultMeta, Sampling, Stage, MASK_TOKEN,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex as AsyncMutex};
use tokio::time::timeout;

use crate::framed::{read_message, write_bytes, write_message, ReadError};
use crate::hop::{call_stage, HopLimits};
use crate::hosted::{ArStepOut, Hosted};

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Limits for this server's calls downstream (and the frame size it accepts).
    pub limits: HopLimits,
    /// Interval of keepalive frames sent upstream while a request is in progress.
    pub keepalive: Duration,
    /// A connection with no frame for this long is closed.
    pub idle_timeout: Duration,
    /// Name reported in hop statistics (default: the listen address).
    pub name: String,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            limits: HopLimits::default(),
            keepalive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(300),
            name: String::new(),
        }
    }
}

struct Shared {
    hosted: Mutex<Hosted>,
    info: blocktrain_protocol::frame::ServerInfo,
    opts: ServeOptions,
    /// Passes computed: diffusion requests run, AR steps run.
    served: AtomicU64,
}

type Upstream = Arc<AsyncMutex<OwnedWriteHalf>>;

/// Serves `hosted` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, hosted: Hosted, mut opts: ServeOptions) {
    if opts.name.is_empty() {
        opts.name = listener
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
    }
    let shared = Arc::new(Shared {
        info: hosted.info.clone(),
        hosted: Mutex::new(hosted),
        opts,
        served: AtomicU64::new(0),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, say: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(handle(stream, peer, shared.clone()));
    }
}

/// Serves `hosted` on a runtime of its own in a background thread (tests, benches).
pub fn spawn(addr: SocketAddr, hosted: Hosted, opts: ServeOptions) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async move {
            let listener = TcpListener::from_std(std_listener).expect("listener");
            serve(listener, hosted, opts).await
        });
    });
    Ok(local)
}

/// Writes a frame upstream, giving up on a caller that stops reading (a full socket
/// buffer would otherwise hold this handler, and its KV cache, forever).
async fn send_up(up: &Upstream, message: &Message, limit: Duration) -> bool {
    let write = async { write_message(&mut *up.lock().await, message).await };
    matches!(timeout(limit, write).await, Ok(Ok(_)))
}

fn error(request_id: u64, code: ErrorCode, message: String, shared: &Shared) -> Message {
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

async fn handle(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
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
struct Keepalive {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Keepalive {
    fn start(up: &Upstream, every: Duration, write_limit: Duration) -> Keepalive {
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

    async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Checks what every hop checks: same model, the blocks the route gives this server,
/// and a route that covers the whole stack from the top block down to block 1.
fn check_route(
    shared: &Shared,
    model_id: &str,
    route: &[Stage],
    hop: u32,
    descending: bool,
) -> Result<(), (ErrorCode, String)> {
    let info = &shared.info;
    if model_id != info.model_id {
        return Err((
            ErrorCode::Mismatch,
            format!(
                "this server holds model {}, the request is for {model_id}",
                info.model_id
            ),
        ));
    }
    let mine = route[hop as usize].blocks;
    if mine != info.blocks {
        return Err((
            ErrorCode::Mismatch,
            format!(
                "this server hosts blocks {}, the route sent it {mine}",
                info.blocks
            ),
        ));
    }
    let mut ranges: Vec<_> = route.iter().map(|s| s.blocks).collect();
    if descending {
        ranges.reverse();
    }
    let covers = ranges.first().is_some_and(|r| r.first == 1)
        && ranges.last().is_some_and(|r| r.last == info.total)
        && ranges
            .windows(2)
            .all(|w| w[0].last.checked_add(1) == Some(w[1].first));
    if !covers {
        let listed: Vec<String> = route.iter().map(|s| s.blocks.to_string()).collect();
        return Err((
            ErrorCode::BadRequest,
            format!(
                "the route [{}] does not cover 1..{} exactly once in order",
                listed.join(", "),
                info.total
            ),
        ));
    }
    Ok(())
}

fn check_sampling(s: &Sampling) -> Result<(), String> {
    if !(s.temperature.is_finite() && s.temperature > 0.0) {
        return Err(format!(
            "temperature must be positive, got {}",
            s.temperature
        ));
    }
    if s.steps_per_block == 0 || s.steps_per_block > 4096 {
        return Err(format!(
            "steps_per_block must be 1..=4096, got {}",
            s.steps_per_block
        ));
    }
    Ok(())
}

async fn denoise(
    up: &Upstream,
    meta: DenoiseMeta,
    tokens: Vec<u16>,
    latent: Option<LatentState>,
    shared: &Arc<Shared>,
) -> bool {
    let id = meta.request_id;
    let reply = match run_denoise(up, meta, tokens, latent, shared).await {
        Ok(m) => m,
        Err((code, message)) => error(id, code, message, shared),
    };
    send_up(up, &reply, shared.opts.limits.stall_timeout).await
}

async fn run_denoise(
    up: &Upstream,
    mut meta: DenoiseMeta,
    tokens: Vec<u16>,
    latent: Option<LatentState>,
    shared: &Arc<Shared>,
) -> Result<Message, (ErrorCode, String)> {
    check_route(shared, &meta.model_id, &meta.route, meta.hop, true)?;
    check_sampling(&meta.sampling).map_err(|m| (ErrorCode::BadRequest, m))?;
    if tokens.is_empty() || tokens.len() > shared.info.max_tokens as usize {
        return Err((
            ErrorCode::BadRequest,
            format!(
                "{} tokens: this server takes 1..={}",
                tokens.len(),
                shared.info.max_tokens
            ),
        ));
    }
    let keepalive = Keepalive::start(up, shared.opts.keepalive, shared.opts.limits.stall_timeout);
    let started = Instant::now();
    let work = {
        let shared = shared.clone();
        let (sampling, seed) = (meta.sampling.clone(), meta.seed);
        tokio::task::spawn_blocking(move || {
            let hosted = shared.hosted.lock().unwrap_or_else(|p| p.into_inner());
            hosted.denoise(&tokens, latent.as_ref(), &sampling, seed)
        })
    };
    let (tokens, latent) = match work.await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            keepalive.finish().await;
            // A request it cannot take is the sender's to fix; anything else is ours.
            let code = match e {
                crate::ServeError::Rejected(_) => ErrorCode::BadRequest,
                _ => ErrorCode::Internal,
            };
            return Err((code, e.to_string()));
        }
        Err(e) => {
            keepalive.finish().await;
            return Err((ErrorCode::Internal, format!("compute failed: {e}")));
        }
    };
    shared.served.fetch_add(1, Ordering::Relaxed);
    let last = meta.hop as usize + 1 == meta.route.len();
    // What goes on down the stack: bytes + mask bitmap, and the f16 latent if any.
    let bytes_out = if last {
        0
    } else {
        encode_tokens(&tokens).len() + latent.as_ref().map_or(0, |z| 2 * z.values.len())
    };
    meta.hops.push(HopStat {
        blocks: shared.info.blocks,
        server: shared.opts.name.clone(),
        compute_ms: started.elapsed().as_secs_f64() * 1e3,
        failovers: 0,
        bytes_out: bytes_out as u64,
    });
    let reply = if last {
        if tokens.iter().any(|&t| t >= MASK_TOKEN) {
            keepalive.finish().await;
            return Err((
                ErrorCode::Internal,
                "positions left masked after block 1".into(),
            ));
        }
        let bytes = tokens.iter().map(|&t| t as u8).collect();
        Message::Result(
            ResultMeta {
                request_id: meta.request_id,
                hops: meta.hops,
            },
            bytes,
        )
    } else {
        meta.hop += 1;
        let next = meta.route[meta.hop as usize].clone();
        let answer = call_stage(&next, meta.request_id, &shared.opts.limits, |failovers| {
            let mut m = meta.clone();
            if let Some(me) = m.hops.last_mut() {
                me.failovers = failovers;
            }
            match &latent {
                Some(z) => Message::Latent(m, tokens.clone(), z.clone()).encode(),
                None => Message::Denoise(m, tokens.clone()).encode(),
            }
        })
        .await;
        answer.message
    };
    keepalive.finish().await;
    Ok(reply)
}

/// One AR session's state on this server.
#[derive(Default)]
struct ArSession {
    /// From the session's first step: route, model, sampling, this server's hop.
    setup: Option<ArSetup>,
    cache: Option<KvCache>,
    next: Option<(OwnedReadHalf, OwnedWriteHalf, String)>,
}

async fn ar_step(
    up: &Upstream,
    session: &mut ArSession,
    meta: ArStepMeta,
    payload: ArPayload,
    shared: &Arc<Shared>,
) -> bool {
    let id = meta.session;
    // Keepalives while this stage and those after it work, as for diffusion requests:
    // a long prefill is slow, not stalled.
    let keepalive = Keepalive::start(up, shared.opts.keepalive, shared.opts.limits.stall_timeout);
    let reply = match run_ar_step(session, meta, payload, shared).await {
        Ok(m) => m,
        Err((code, message)) => error(id, code, message, shared),
    };
    keepalive.finish().await;
    let failed = matches!(reply, Message::Error(_));
    send_up(up, &reply, shared.opts.limits.stall_timeout).await && !failed
}

async fn run_ar_step(
    session: &mut ArSession,
    mut meta: ArStepMeta,
    payload: ArPayload,
    shared: &Arc<Shared>,
) -> Result<Message, (ErrorCode, String)> {
    if let Some(setup) = meta.setup.take() {
        if session.setup.is_some() {
            return Err((
                ErrorCode::BadRequest,
                "this AR session is already set up".into(),
            ));
        }
        check_route(shared, &setup.model_id, &setup.route, setup.hop, false)?;
        check_sampling(&setup.sampling).map_err(|m| (ErrorCode::BadRequest, m))?;
        session.setup = Some(setup);
    }
    let Some(setup) = session.setup.clone() else {
        return Err((
            ErrorCode::BadRequest,
            "the first step of an AR session must carry its setup".into(),
        ));
    };
    let started = Instant::now();
    let mut cache = session.cache.take().unwrap_or_default();
    let work = {
        let shared = shared.clone();
        let (sampling, seed, index) = (setup.sampling.clone(), setup.seed, meta.output_index);
        let hidden = meta.hidden;
        tokio::task::spawn_blocking(move || {
            let hosted = shared.hosted.lock().unwrap_or_else(|p| p.into_inner());
            let out = hosted.ar_step(&mut cache, &payload, hidden, &sampling, seed, index);
            (out, cache)
        })
    };
    let out = match work.await {
        Ok((Ok(out), cache)) => {
            session.cache = Some(cache);
            shared.served.fetch_add(1, Ordering::Relaxed);
            out
        }
        Ok((Err(e), _)) => return Err((ErrorCode::BadRequest, e.to_string())),
        Err(e) => return Err((ErrorCode::Internal, format!("compute failed: {e}"))),
    };
    let mut me = HopStat {
        blocks: shared.info.blocks,
        server: shared.opts.name.clone(),
        compute_ms: started.elapsed().as_secs_f64() * 1e3,
        failovers: 0,
        bytes_out: 0,
    };
    let hidden = match out {
        ArStepOut::Byte(byte) => {
            return Ok(Message::ArOutput(ArOutput {
                session: meta.session,
                byte,
                hops: vec![me],
            }))
        }
        ArStepOut::Hidden(values, rows) => {
            meta.hidden = Some((rows, shared.info.d_model));
            me.bytes_out = 2 * values.len() as u64; // f16 hidden states
            values
        }
    };
    let Some(next) = setup.route.get(setup.hop as usize + 1).cloned() else {
        return Err((
            ErrorCode::BadRequest,
            "the route has no stage after this one".into(),
        ));
    };
    if session.next.is_none() {
        // The next stage hears the setup once, on the connection's first step.
        meta.setup = Some(ArSetup {
            hop: setup.hop + 1,
            ..setup
        });
    }
    let limits = &shared.opts.limits;
    let unavailable = |why: String| {
        (
            ErrorCode::Unavailable,
            format!(
                "AR stage {} failed: {why} (the AR baseline keeps KV caches on its servers and does not fail over)",
                next.blocks
            ),
        )
    };
    if session.next.is_none() {
        let addr = next.replicas[0].clone();
        let stream = match timeout(limits.connect_timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(unavailable(format!("{addr}: {e}"))),
            Err(_) => return Err(unavailable(format!("{addr}: connect timed out"))),
        };
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        session.next = Some((r, w, addr));
    }
    // Taken out while in use: it goes back only if this step's exchange completed, so a
    // broken connection is never reused.
    let (mut rd, mut wr, addr) = session.next.take().expect("connected above");
    let frame = Message::ArStep(meta, ArPayload::Hidden(hidden)).encode();
    match timeout(limits.stall_timeout, write_bytes(&mut wr, &frame)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(unavailable(format!("sending: {e}"))),
        Err(_) => return Err(unavailable(format!("{addr} stopped reading"))),
    }
    loop {
        let reply = match timeout(
            limits.stall_timeout,
            read_message(&mut rd, limits.max_frame),
        )
        .await
        {
            Ok(Ok(Message::Keepalive)) => continue,
            Ok(Ok(Message::ArOutput(mut o))) => {
                o.hops.insert(0, me);
                Ok(Message::ArOutput(o))
            }
            Ok(Ok(Message::Error(e))) => Ok(Message::Error(e)),
            Ok(Ok(other)) => {
                let what = crate::kind_name(&other);
                return Err(unavailable(format!("{addr} sent a {what} frame")));
            }
            Ok(Err(e)) => return Err(unavailable(format!("{addr}: {e}"))),
            Err(_) => return Err(unavailable(format!("{addr} stalled"))),
        };
        session.next = Some((rd, wr, addr));
        return reply;
    }
}
