//! The checks every hop makes before it computes: route, sampling settings and (AR)
//! the log-probabilities asked for.
use blocktrain_protocol::frame::{ErrorCode, Sampling, Stage, MAX_TOP_LOGPROBS};

use super::Shared;

/// Checks what every hop checks: same model, the blocks the route gives this server,
/// and a route that covers the whole stack from the top block down to block 1.
pub(super) fn check_route(
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

pub(super) fn check_sampling(s: &Sampling) -> Result<(), String> {
    if !(s.temperature.is_finite() && s.temperature > 0.0) {
        return Err(format!(
            "temperature must be positive, got {}",
            s.temperature
        ));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(format!("top_p must be in (0, 1], got {}", s.top_p));
    }
    if s.steps_per_block == 0 || s.steps_per_block > 4096 {
        return Err(format!(
            "steps_per_block must be 1..=4096, got {}",
            s.steps_per_block
        ));
    }
    Ok(())
}

/// An AR setup's `logprobs`: alternatives per byte, at most [`MAX_TOP_LOGPROBS`].
pub(super) fn check_logprobs(n: Option<u32>) -> Result<(), String> {
    match n {
        Some(n) if n > MAX_TOP_LOGPROBS => Err(format!(
            "logprobs asks for the {n} most likely bytes per step: this server reports at most {MAX_TOP_LOGPROBS}"
        )),
        _ => Ok(()),
    }
}
