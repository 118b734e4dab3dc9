//! The inference client: find out what each server hosts, build the route, send one
//! request down it.
//!
//! A route file lists servers, one `host:port` per line (`#` comments); what each one
//! hosts is asked over the wire ([`discover`]), so the file cannot disagree with the
//! servers. Servers hosting the same blocks are replicas of one stage.
use std::collections::BTreeMap;
use std::time::Instant;

use blocktrain_protocol::frame::{
    DenoiseMeta, ErrorCode, HopError, HopStat, Message, Sampling, ServerInfo, Stage, MASK_TOKEN,
};

use crate::hop::{call_stage, Expect, HopLimits};
use crate::ServeError;

mod ar;
pub use ar::{generate_ar, generate_ar_scored, generate_ar_with};

/// Servers named by `--route`: a file of `host:port` lines, or a comma-separated list.
pub fn load_route(arg: &str) -> Result<Vec<String>, ServeError> {
    let path = std::path::Path::new(arg);
    let text = if path.is_file() {
        std::fs::read_to_string(path).map_err(crate::io_err(path))?
    } else {
        arg.replace(',', "\n")
    };
    let servers: Vec<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.split_whitespace().next().unwrap_or(l).to_string())
        .collect();
    if servers.is_empty() {
        return Err(ServeError::Config(format!(
            "--route {arg}: no servers (give a file with one host:port per line, or a comma-separated list)"
        )));
    }
    Ok(servers)
}

/// A route built from the servers' own descriptions.
#[derive(Clone, Debug)]
pub struct Plan {
    /// What every stage hosts the same of.
    pub model_id: String,
    /// `block` (masked diffusion), `edm` (embedding diffusion) or `ar`.
    pub family: String,
    /// Blocks (or AR layers) in the model.
    pub total: u32,
    /// Stages in traversal order (diffusion: highest blocks first; AR: layer 1 first).
    pub stages: Vec<Stage>,
    /// Smallest token limit of any server.
    pub max_tokens: u32,
    /// Smallest trained window of any server.
    pub window: u32,
    /// Servers that did not answer, with why (left out of the plan).
    pub unreachable: Vec<String>,
    /// Each answering server's `Info` round trip when the plan was made, ms (connect
    /// included): what [`crate::rank`] orders replicas by.
    pub latency_ms: BTreeMap<String, f64>,
}

/// Asks one server what it hosts (and how many passes it has computed); its greeting
/// on a fresh connection, or an `Info` over a pooled one.
pub async fn server_info(addr: &str, limits: &HopLimits) -> Result<ServerInfo, String> {
    crate::hop::info(addr, limits).await
}

/// Asks every server what it hosts (in parallel) and builds the route.
pub async fn discover(servers: &[String], limits: &HopLimits) -> Result<Plan, ServeError> {
    plan_from(ask_all(servers, limits).await)
}

/// One server's answer to "what do you host": its info and the round trip in ms.
pub type Answered = (String, Result<(ServerInfo, f64), String>);

/// Asks every server (each once, in parallel) what it hosts, timing each round trip.
pub async fn ask_all(servers: &[String], limits: &HopLimits) -> Vec<Answered> {
    // A server listed twice would be tried twice when it is down.
    let mut unique: Vec<&String> = Vec::new();
    for s in servers {
        if !unique.contains(&s) {
            unique.push(s);
        }
    }
    futures_join_all(unique.into_iter().map(|a| {
        let (a, limits) = (a.clone(), limits.clone());
        async move {
            let asked = Instant::now();
            let info = server_info(&a, &limits).await;
            (a, info.map(|i| (i, asked.elapsed().as_secs_f64() * 1e3)))
        }
    }))
    .await
}

/// The route from servers' answers ([`ask_all`]): those that answered, grouped into
/// stages by the blocks they host.
pub fn plan_from(answers: Vec<Answered>) -> Result<Plan, ServeError> {
    let mut infos = Vec::new();
    let mut unreachable = Vec::new();
    let mut latency_ms = BTreeMap::new();
    for (addr, answer) in answers {
        match answer {
            Ok((info, ms)) => {
                latency_ms.insert(addr.clone(), ms);
                infos.push((addr, info))
            }
            Err(why) => unreachable.push(format!("{addr}: {why}")),
        }
    }
    let Some((_, first)) = infos.first() else {
        return Err(ServeError::Network(format!(
            "no server of the route answered: {}",
            unreachable.join("; ")
        )));
    };
    let (model_id, family, total) = (first.model_id.clone(), first.family.clone(), first.total);
    if let Some((addr, i)) = infos
        .iter()
        .find(|(_, i)| i.model_id != model_id || i.family != family || i.total != total)
    {
        return Err(ServeError::Config(format!(
            "{addr} serves {} model {} of {} parts, others serve {family} model {model_id} of {total}",
            i.family, i.model_id, i.total
        )));
    }
    let mut by_range: BTreeMap<(u32, u32), Vec<String>> = BTreeMap::new();
    for (addr, i) in &infos {
        by_range
            .entry((i.blocks.first, i.blocks.last))
            .or_default()
            .push(addr.clone());
    }
    let mut stages: Vec<Stage> = Vec::new();
    let mut next = 1;
    for ((first, last), replicas) in &by_range {
        if *first > next {
            return Err(ServeError::Config(format!(
                "no server hosts blocks {next}..{}: the route's servers host {}",
                first - 1,
                describe(&by_range)
            )));
        }
        if *first < next {
            return Err(ServeError::Config(format!(
                "servers overlap at blocks {first}..{}: the route's servers host {} (replicas must host the same blocks)",
                next - 1,
                describe(&by_range)
            )));
        }
        stages.push(Stage {
            blocks: blocktrain_protocol::frame::BlockRange {
                first: *first,
                last: *last,
            },
            replicas: replicas.clone(),
        });
        next = last.saturating_add(1);
    }
    if next != total.saturating_add(1) {
        return Err(ServeError::Config(format!(
            "no server hosts blocks {next}..{total}: the route's servers host {}",
            describe(&by_range)
        )));
    }
    if family != "ar" {
        stages.reverse(); // diffusion runs from the top block (fully masked) down
    }
    Ok(Plan {
        model_id,
        family,
        total,
        stages,
        max_tokens: infos.iter().map(|(_, i)| i.max_tokens).min().unwrap_or(0),
        window: infos.iter().map(|(_, i)| i.window).min().unwrap_or(0),
        unreachable,
        latency_ms,
    })
}

fn describe(by_range: &BTreeMap<(u32, u32), Vec<String>>) -> String {
    by_range
        .iter()
        .map(|((a, b), s)| format!("{a}..{b} ({})", s.join(", ")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the futures concurrently (as tasks) and collects their outputs in order.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("info task"));
    }
    out
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct Request {
    /// Prompt bytes (never changed).
    pub prompt: Vec<u8>,
    /// Output bytes.
    pub len: usize,
    /// Sampling settings.
    pub sampling: Sampling,
    /// Seed.
    pub seed: u64,
}

/// A finished generation.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The output bytes (prompt excluded).
    pub output: Vec<u8>,
    /// Per-stage reports (AR: compute and bytes summed over steps).
    pub hops: Vec<HopStat>,
    /// Seconds from sending the request to the last byte.
    pub seconds: f64,
    /// Traversals of the stack, as the servers reported them: how many times the first
    /// stage computed for this request (1 for diffusion, one per byte for AR).
    pub traversals: usize,
    /// Replicas of the first stage the client gave up on (later stages' failovers are
    /// in `hops`, and for AR in `stage_failovers`).
    pub entry_failovers: u32,
    /// AR: replicas given up on per stage (plan order), whether one died mid-session
    /// (a new session and a re-prefill) or the stage before passed over it at a
    /// session's start (no cost). Empty for diffusion.
    pub stage_failovers: Vec<u32>,
    /// AR: positions the servers had cached and recomputed after failovers (the failed
    /// session's context, re-prefilled on every stage). 0 for diffusion.
    pub replayed_positions: usize,
    /// AR with log-probabilities asked for ([`generate_ar_scored`]): one per output
    /// byte. Empty otherwise.
    pub logprobs: Vec<blocktrain_protocol::frame::ByteLogprobs>,
}

fn check_request(plan: &Plan, req: &Request) -> Result<(), ServeError> {
    let bad = |m: String| Err(ServeError::Config(m));
    if req.len == 0 {
        return bad("the output length must be at least 1 byte".into());
    }
    if !(req.sampling.temperature.is_finite() && req.sampling.temperature > 0.0) {
        return bad(format!(
            "temperature must be positive, got {}",
            req.sampling.temperature
        ));
    }
    if plan.family == "ar" {
        // The AR pipeline keeps its context inside the trained window (see generate_ar).
        if plan.window as usize > plan.max_tokens as usize || plan.window < 2 {
            return bad(format!(
                "the route's servers take {} positions, less than the model's window of {}",
                plan.max_tokens, plan.window
            ));
        }
        return Ok(());
    }
    let total = req.prompt.len().checked_add(req.len);
    if total.is_none_or(|t| t > plan.max_tokens as usize) {
        return bad(format!(
            "prompt ({} bytes) + output ({} bytes) exceeds the {} positions the route's servers take",
            req.prompt.len(),
            req.len,
            plan.max_tokens
        ));
    }
    Ok(())
}

/// A stage's error as the caller's error: a request the servers refused is the
/// caller's to fix (a `Config` error: HTTP 400 at the gateway), anything else is the
/// network's.
fn stage_error(what: String, e: &HopError) -> ServeError {
    let at = e.blocks.map_or("?".into(), |b| b.to_string());
    let m = format!("{what} failed at {at}: {}", e.message);
    match e.code {
        ErrorCode::BadRequest => ServeError::Config(m),
        _ => ServeError::Network(m),
    }
}

/// One traversal: the request goes to the top stage, each stage forwards the partially
/// unmasked bytes, the last stage's result comes back.
pub async fn generate(
    plan: &Plan,
    req: &Request,
    limits: &HopLimits,
) -> Result<Generation, ServeError> {
    if plan.family == "ar" {
        return generate_ar(plan, req, limits).await;
    }
    check_request(plan, req)?;
    let tokens: Vec<u16> = req
        .prompt
        .iter()
        .map(|&b| b as u16)
        .chain(std::iter::repeat_n(MASK_TOKEN, req.len))
        .collect();
    let request_id = rand::random::<u64>();
    let meta = DenoiseMeta {
        request_id,
        model_id: plan.model_id.clone(),
        sampling: req.sampling.clone(),
        seed: req.seed,
        route: plan.stages.clone(),
        hop: 0,
        hops: Vec::new(),
    };
    let started = Instant::now();
    let expect = Expect {
        model_id: Some(&plan.model_id),
        ..Expect::default()
    };
    let deadline = limits.deadline(plan.stages.len());
    let answer = call_stage(
        &plan.stages[0],
        request_id,
        limits,
        &expect,
        deadline,
        |_| Message::Denoise(meta.clone(), tokens.clone()).encode(),
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    match answer.message {
        Message::Result(meta, bytes) if bytes.len() == tokens.len() => Ok(Generation {
            output: bytes[req.prompt.len()..].to_vec(),
            traversals: traversals_in(&meta.hops, &plan.stages[0]),
            hops: meta.hops,
            seconds,
            entry_failovers: answer.failovers,
            stage_failovers: Vec::new(),
            replayed_positions: 0,
            logprobs: Vec::new(),
        }),
        Message::Result(_, bytes) => Err(ServeError::Network(format!(
            "the route returned {} bytes for a {}-byte sequence",
            bytes.len(),
            tokens.len()
        ))),
        Message::Error(e) => Err(stage_error("generation".into(), &e)),
        other => Err(ServeError::Network(format!(
            "unexpected {} frame",
            crate::kind_name(&other)
        ))),
    }
}

/// How many passes of the first stage `hops` report: each server appends its own report
/// when it has computed, so this counts traversals as the servers made them.
fn traversals_in(hops: &[HopStat], first: &Stage) -> usize {
    hops.iter().filter(|h| h.blocks == first.blocks).count()
}
