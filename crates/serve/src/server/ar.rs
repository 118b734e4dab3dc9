//! AR sessions: each `ArStep` runs this stage's layers against the session's KV cache
//! and goes on over a persistent connection to the next stage (no failover).
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use blocktrain_model::transformer::KvCache;
use blocktrain_protocol::frame::{
    ArOutput, ArPayload, ArSetup, ArStepMeta, ErrorCode, HopStat, Message,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;

use super::check::{check_route, check_sampling};
use super::conn::{error, send_up, Keepalive};
use super::{Shared, Upstream};
use crate::framed::{read_message, write_bytes};
use crate::hop::Expect;
use crate::hosted::ArStepOut;

/// One AR session's state on this server.
#[derive(Default)]
pub(super) struct ArSession {
    /// From the session's first step: route, model, sampling, this server's hop.
    setup: Option<ArSetup>,
    cache: Option<KvCache>,
    next: Option<(OwnedReadHalf, OwnedWriteHalf, String)>,
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
    // Each step is admitted as a request (the session's compute is its steps').
    let permit = shared.gate.admit(None)?;
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
    drop(permit);
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
        let expect = Expect {
            blocks: Some(next.blocks),
            ..shared.expect()
        };
        // Greeted and checked before anything is sent (no relay to a non-server).
        let (stream, _) = crate::hop::connect(&addr, limits, &expect)
            .await
            .map_err(|why| unavailable(format!("{addr}: {why}")))?;
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
