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
//!
//! Each step's exchange with the next stage has the hop call's deadline
//! ([`HopLimits::deadline`] of the stages after this one), keepalives or not: a next
//! stage that only sends keepalives fails the step like a dead one (the client then
//! re-prefills over another replica). Its answer is read into the server's byte budget
//! and held until relayed upstream, as a diffusion answer is.
use std::sync::Arc;
use std::time::{Duration, Instant};

use blocktrain_model::transformer::KvCache;
use blocktrain_protocol::frame::{
    ArOutput, ArPayload, ArSetup, ArStepMeta, BlockRange, ErrorCode, HopStat, Message, Stage,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;

use super::check::{check_logprobs, check_route, check_sampling};
use super::conn::{error, send_up, Keepalive};
use super::{Shared, Upstream};
use crate::budget::Held;
use crate::framed::{write_bytes, ReadError};
use crate::hop::{over_budget, past_deadline, Expect, HopLimits};
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
    // An answer relayed from the next stage holds its bytes of the budget until sent.
    let (reply, _held) = match run_ar_step(session, meta, payload, shared).await {
        Ok(m) => m,
        Err(e) => {
            let mut m = error(id, e.code, e.message, shared);
            if let (Message::Error(h), Some(b)) = (&mut m, e.blocks) {
                h.blocks = Some(b);
            }
            (m, None)
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
) -> Result<(Message, Option<Held>), StepError> {
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
            let out = ArOutput {
                session: meta.session,
                byte,
                hops: vec![me],
                logprobs,
            };
            return Ok((Message::ArOutput(out), None));
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
    // The next stage and those after it: the deadline of each step's exchange.
    let deadline = shared
        .opts
        .limits
        .deadline(setup.route.len() - setup.hop as usize - 1);
    let (reply, held) = match session.next.take() {
        Some(mut link) => {
            let frame = encode(meta, hidden);
            let reply = exchange(&mut link, &frame, &shared.opts.limits, deadline).await;
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
            let frame = encode(meta, hidden);
            let (link, reply, failovers) = open_next(&next, &frame, shared, deadline).await?;
            session.next = Some(link);
            me.failovers = failovers;
            reply
        }
    };
    let reply = match reply {
        Message::ArOutput(mut o) => {
            o.hops.insert(0, me);
            Message::ArOutput(o)
        }
        other => other, // an Error from further down, passed up as it is
    };
    Ok((reply, held))
}

fn encode(meta: ArStepMeta, hidden: Vec<f32>) -> Vec<u8> {
    Message::ArStep(meta, ArPayload::Hidden(hidden)).encode()
}

/// A session's first step to the next stage: its replicas in the route's order (the
/// client leaves out those that failed it), each greeted and checked before anything is
/// sent (no relay to a non-server), until one answers within `deadline`. Returns the
/// link, the answer (with the budget it holds) and how many replicas were given up on;
/// with none, `Unavailable` naming the stage.
async fn open_next(
    next: &Stage,
    frame: &[u8],
    shared: &Shared,
    deadline: Duration,
) -> Result<(Link, (Message, Option<Held>), u32), StepError> {
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
        match exchange(&mut link, frame, limits, deadline).await {
            // The replica itself failed, was busy or does not host what the route says:
            // another one may do. Errors from further down would be repeated.
            Ok((Message::Error(e), _))
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
/// skipping keepalives, until `deadline`; a broken connection, silence for
/// `stall_timeout`, no answer by the deadline, an answer that does not fit the byte
/// budget or another frame is the replica's failure (its connection is then dropped).
async fn exchange(
    link: &mut Link,
    frame: &[u8],
    limits: &HopLimits,
    deadline: Duration,
) -> Result<(Message, Option<Held>), String> {
    timeout(deadline, exchange_within(link, frame, limits))
        .await
        .unwrap_or_else(|_| Err(past_deadline(deadline)))
}

async fn exchange_within(
    link: &mut Link,
    frame: &[u8],
    limits: &HopLimits,
) -> Result<(Message, Option<Held>), String> {
    match timeout(limits.stall_timeout, write_bytes(&mut link.wr, frame)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("sending: {e}")),
        Err(_) => return Err("stopped reading".into()),
    }
    loop {
        match timeout(limits.stall_timeout, limits.read_answer(&mut link.rd)).await {
            Ok(Ok((Message::Keepalive, _))) => continue,
            Ok(Ok((m @ (Message::ArOutput(_) | Message::Error(_)), held))) => return Ok((m, held)),
            Ok(Ok((other, _))) => return Err(format!("sent a {} frame", crate::kind_name(&other))),
            Ok(Err(ReadError::Refused(why))) => return Err(over_budget(&why)),
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
