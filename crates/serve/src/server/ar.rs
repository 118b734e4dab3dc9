//! AR sessions: each `ArStep` runs this stage's layers against the session's KV cache
//! and goes on over a persistent connection to the next stage.
//!
//! Failover is the client's: it holds the whole context, so when a stage dies
//! mid-session it starts a new session over the replicas left and re-prefills (see
//! `client::ar`). A server only helps it: a session's first step tries the next stage's
//! replicas in the route's order (nothing is cached downstream yet, so skipping a dead
//! one costs nothing; it is reported in `HopStat::failovers`), and when the replica
//! serving a session fails later, the error sent up names that stage (`blocks`) and
//! replica, so the client knows which one to leave out.
use std::sync::Arc;
use std::time::Instant;

use blocktrain_model::transformer::KvCache;
use blocktrain_protocol::frame::{
    ArOutput, ArPayload, ArSetup, ArStepMeta, BlockRange, ErrorCode, HopStat, Message, Stage,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;

use super::check::{check_logprobs, check_route, check_sampling};
use super::conn::{error, send_up, Keepalive};
use super::{Shared, Upstream};
use crate::framed::{read_message, write_bytes};
use crate::hop::{Expect, HopLimits};
use crate::hosted::ArStepOut;

/// One AR session's state on this server.
#[derive(Default)]
pub(super) struct ArSession {
    /// From the session's first step: route, model, sampling, this server's hop.
    setup: Option<ArSetup>,
    cache: Option<KvCache>,
    next: Option<Link>,
}

/// The session's connection to the replica of the next stage that serves it.
struct Link {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    addr: String,
}

/// Why a step failed; `blocks` names the stage at fault when it is not this server's
/// (the next stage, which the client must then route around).
struct StepError {
    code: ErrorCode,
    message: String,
    blocks: Option<BlockRange>,
}

impl From<(ErrorCode, String)> for StepError {
    fn from((code, message): (ErrorCode, String)) -> StepError {
        StepError {
            code,
            message,
            blocks: None,
        }
    }
}

pub(super) async fn ar_step(
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
        Err(e) => {
            let mut m = error(id, e.code, e.message, shared);
            if let (Message::Error(h), Some(b)) = (&mut m, e.blocks) {
                h.blocks = Some(b);
            }
            m
        }
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
) -> Result<Message, StepError> {
    if let Some(setup) = meta.setup.take() {
        if session.setup.is_some() {
            return Err((
                ErrorCode::BadRequest,
                "this AR session is already set up".to_string(),
            )
                .into());
        }
        check_route(shared, &setup.model_id, &setup.route, setup.hop, false)?;
        check_sampling(&setup.sampling).map_err(|m| (ErrorCode::BadRequest, m))?;
        check_logprobs(setup.logprobs).map_err(|m| (ErrorCode::BadRequest, m))?;
        session.setup = Some(setup);
    }
    let Some(setup) = session.setup.clone() else {
        return Err((
            ErrorCode::BadRequest,
            "the first step of an AR session must carry its setup".to_string(),
        )
            .into());
    };
    // Each step is admitted as a request (the session's compute is its steps').
    let permit = shared.gate.admit(None)?;
    let started = Instant::now();
    let mut cache = session.cache.take().unwrap_or_default();
    let work = {
        let shared = shared.clone();
        let (sampling, seed, index) = (setup.sampling.clone(), setup.seed, meta.output_index);
        let (hidden, logprobs) = (meta.hidden, setup.logprobs);
        tokio::task::spawn_blocking(move || {
            let hosted = shared.hosted.lock().unwrap_or_else(|p| p.into_inner());
            let out = hosted.ar_step(
                &mut cache, &payload, hidden, &sampling, seed, index, logprobs,
            );
            (out, cache)
        })
    };
    let out = match work.await {
        Ok((Ok(out), cache)) => {
            session.cache = Some(cache);
            shared.passed(started);
            out
        }
        Ok((Err(e), _)) => return Err((ErrorCode::BadRequest, e.to_string()).into()),
        Err(e) => return Err((ErrorCode::Internal, format!("compute failed: {e}")).into()),
    };
    drop(permit);
    let mut me = HopStat {
        blocks: shared.info.blocks,
        server: shared.opts.name.clone(),
        compute_ms: started.elapsed().as_secs_f64() * 1e3,
        failovers: 0,
        bytes_out: 0,
    };
    let hidden = match out {
        ArStepOut::Byte(byte, logprobs) => {
            return Ok(Message::ArOutput(ArOutput {
                session: meta.session,
                byte,
                hops: vec![me],
                logprobs,
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
            "the route has no stage after this one".to_string(),
        )
            .into());
    };
    let reply = match session.next.take() {
        Some(mut link) => {
            let reply = exchange(&mut link, &encode(meta, hidden), &shared.opts.limits).await;
            match reply {
                Ok(reply) => {
                    // Back only once this step's exchange completed: a broken connection
                    // is never reused.
                    session.next = Some(link);
                    reply
                }
                Err(why) => {
                    return Err(StepError {
                        code: ErrorCode::Unavailable,
                        message: format!(
                            "AR stage {} failed at {}: {why} (its KV cache is lost: the client re-prefills over another replica)",
                            next.blocks, link.addr
                        ),
                        blocks: Some(next.blocks),
                    })
                }
            }
        }
        None => {
            // The next stage hears the setup once, on the connection's first step.
            meta.setup = Some(ArSetup {
                hop: setup.hop + 1,
                ..setup
            });
            let (link, reply, failovers) = open_next(&next, &encode(meta, hidden), shared).await?;
            session.next = Some(link);
            me.failovers = failovers;
            reply
        }
    };
    Ok(match reply {
        Message::ArOutput(mut o) => {
            o.hops.insert(0, me);
            Message::ArOutput(o)
        }
        other => other, // an Error from further down, passed up as it is
    })
}

fn encode(meta: ArStepMeta, hidden: Vec<f32>) -> Vec<u8> {
    Message::ArStep(meta, ArPayload::Hidden(hidden)).encode()
}

/// A session's first step to the next stage: its replicas in the route's order (the
/// client leaves out those that failed it), each greeted and checked before anything is
/// sent (no relay to a non-server), until one answers. Returns the link, the answer
/// and how many replicas were given up on; with none, `Unavailable` naming the stage.
async fn open_next(
    next: &Stage,
    frame: &[u8],
    shared: &Shared,
) -> Result<(Link, Message, u32), StepError> {
    let limits = &shared.opts.limits;
    let expect = Expect {
        blocks: Some(next.blocks),
        ..shared.expect()
    };
    let mut failures = Vec::new();
    for addr in &next.replicas {
        let stream = match crate::hop::connect(addr, limits, &expect).await {
            Ok((stream, _)) => stream,
            Err(why) => {
                failures.push(format!("{addr}: {why}"));
                continue;
            }
        };
        let (rd, wr) = stream.into_split();
        let mut link = Link {
            rd,
            wr,
            addr: addr.clone(),
        };
        match exchange(&mut link, frame, limits).await {
            // The replica itself failed, was busy or does not host what the route says:
            // another one may do. Errors from further down would be repeated.
            Ok(Message::Error(e))
                if e.blocks == Some(next.blocks)
                    && matches!(
                        e.code,
                        ErrorCode::Internal | ErrorCode::Mismatch | ErrorCode::Busy
                    ) =>
            {
                failures.push(format!("{addr}: {:?}: {}", e.code, e.message))
            }
            Ok(reply) => return Ok((link, reply, failures.len() as u32)),
            Err(why) => failures.push(format!("{addr}: {why}")),
        }
        tracing::warn!(%addr, blocks = %next.blocks, "AR replica failed: {}", failures.last().map_or("", |s| s.as_str()));
    }
    Err(StepError {
        code: ErrorCode::Unavailable,
        message: format!(
            "no replica of AR stage {} answered ({})",
            next.blocks,
            failures.join("; ")
        ),
        blocks: Some(next.blocks),
    })
}

/// Sends one step on `link` and waits for its final answer (`ArOutput` or `Error`),
/// skipping keepalives; a broken connection, silence for `stall_timeout` or another
/// frame is the replica's failure.
async fn exchange(link: &mut Link, frame: &[u8], limits: &HopLimits) -> Result<Message, String> {
    match timeout(limits.stall_timeout, write_bytes(&mut link.wr, frame)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("sending: {e}")),
        Err(_) => return Err("stopped reading".into()),
    }
    loop {
        let read = timeout(
            limits.stall_timeout,
            read_message(&mut link.rd, limits.max_frame),
        );
        match read.await {
            Ok(Ok(Message::Keepalive)) => continue,
            Ok(Ok(m @ (Message::ArOutput(_) | Message::Error(_)))) => return Ok(m),
            Ok(Ok(other)) => return Err(format!("sent a {} frame", crate::kind_name(&other))),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => {
                return Err(format!(
                    "stalled: nothing for {:.1} s",
                    limits.stall_timeout.as_secs_f64()
                ))
            }
        }
    }
}
