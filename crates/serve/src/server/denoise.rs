//! Diffusion requests (`Denoise`, `Latent`): run this stage's blocks, then answer with
//! the `Result` (last stage) or forward to the next stage and relay its answer.
use std::sync::Arc;
use std::time::Instant;

use blocktrain_protocol::frame::{
    encode_tokens, DenoiseMeta, ErrorCode, HopStat, LatentState, Message, ResultMeta, MASK_TOKEN,
};

use super::check::{check_route, check_sampling};
use super::conn::{error, send_up, Keepalive};
use super::{Shared, Upstream};
use crate::budget::Held;
use crate::hop::call_stage;
use crate::hosted::DenoiseJob;

pub(super) async fn denoise(
    up: &Upstream,
    meta: DenoiseMeta,
    tokens: Vec<u16>,
    latent: Option<LatentState>,
    shared: &Arc<Shared>,
) -> bool {
    let id = meta.request_id;
    // An answer relayed from the next stage holds its bytes of the budget until sent.
    let (reply, _held) = match run_denoise(up, meta, tokens, latent, shared).await {
        Ok(m) => m,
        Err((code, message)) => (error(id, code, message, shared), None),
    };
    send_up(up, &reply, shared.opts.limits.stall_timeout).await
}

async fn run_denoise(
    up: &Upstream,
    mut meta: DenoiseMeta,
    tokens: Vec<u16>,
    latent: Option<LatentState>,
    shared: &Arc<Shared>,
) -> Result<(Message, Option<Held>), (ErrorCode, String)> {
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
    // Admitted here, or refused before any compute: within the compute budget and with
    // a place among the requests computing or queued (held until the compute is done).
    let token_steps = tokens.len() as u64 * meta.sampling.steps_per_block as u64;
    let permit = shared.gate.admit(Some(token_steps))?;
    let keepalive = Keepalive::start(up, shared.opts.keepalive, shared.opts.limits.stall_timeout);
    let started = Instant::now();
    // Computed in the next batch of its length and steps (alone if none joins it).
    let job = DenoiseJob {
        tokens,
        latent,
        sampling: meta.sampling.clone(),
        seed: meta.seed,
    };
    let (tokens, latent) = match shared.batcher.compute(job).await {
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
            return Err((ErrorCode::Internal, e));
        }
    };
    drop(permit); // waiting for the next stage is not compute
    shared.passed(started);
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
        let result = ResultMeta {
            request_id: meta.request_id,
            hops: meta.hops,
        };
        (Message::Result(result, bytes), None)
    } else {
        meta.hop += 1;
        let next = meta.route[meta.hop as usize].clone();
        let expect = shared.expect();
        // The next stage and those after it: the deadline of this call.
        let stages = meta.route.len() - meta.hop as usize;
        let answer = call_stage(
            &next,
            meta.request_id,
            &shared.opts.limits,
            &expect,
            shared.opts.limits.deadline(stages),
            |failovers| {
                let mut m = meta.clone();
                if let Some(me) = m.hops.last_mut() {
                    me.failovers = failovers;
                }
                match &latent {
                    Some(z) => Message::Latent(m, tokens.clone(), z.clone()).encode(),
                    None => Message::Denoise(m, tokens.clone()).encode(),
                }
            },
        )
        .await;
        (answer.message, answer.held)
    };
    keepalive.finish().await;
    Ok(reply)
}
