//! The inference client: find out what each server hosts, build the route, send one
//! request down it.
//!
//! A route file lists servers, one `host:port` per line (`#` comments); what each one
//! hosts is asked over the wire ([`discover`]), so the file cannot disagree with the
//! servers. Servers hosting the same blocks are replicas of one stage.
use std::collections::BTreeMap;
use std::time::Instant;

use blocktrain_protocol::frame::{
    ArPayload, ArSetup, ArStepMeta, DenoiseMeta, ErrorCode, HopError, HopStat, Message, Sampling,
    ServerInfo, Stage, MASK_TOKEN,
};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::framed::{read_message, write_message};
use crate::hop::{call_stage, Expect, HopLimits};
use crate::ServeError;

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
    // A server listed twice would be tried twice when it is down.
    let mut unique: Vec<&String> = Vec::new();
    for s in servers {
        if !unique.contains(&s) {
            unique.push(s);
        }
    }
    let answers = futures_join_all(unique.into_iter().map(|a| {
        let (a, limits) = (a.clone(), limits.clone());
        async move {
            let asked = Instant::now();
            let info = server_info(&a, &limits).await;
            (a, info.map(|i| (i, asked.elapsed().as_secs_f64() * 1e3)))
        }
    }))
    .await;
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
    /// in `hops`).
    pub entry_failovers: u32,
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
    let answer = call_stage(&plan.stages[0], request_id, limits, &expect, |_| {
        Message::Denoise(meta.clone(), tokens.clone()).encode()
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    match answer.message {
        Message::Result(meta, bytes) if bytes.len() == tokens.len() => Ok(Generation {
            output: bytes[req.prompt.len()..].to_vec(),
            traversals: traversals_in(&meta.hops, &plan.stages[0]),
            hops: meta.hops,
            seconds,
            entry_failovers: answer.failovers,
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

/// The AR baseline: one traversal of the layer stack per output byte, over one
/// persistent connection per hop (the KV caches live with the connections).
///
/// Samples what [`blocktrain_model::sampler::generate_ar`] samples on one host: the
/// context starts as MASK + prompt cut to the model's window, and when it would outgrow
/// the window the session restarts (new connections, empty caches) from the last
/// `window / 2` ids, so positions stay inside what the model was trained on.
pub async fn generate_ar(
    plan: &Plan,
    req: &Request,
    limits: &HopLimits,
) -> Result<Generation, ServeError> {
    generate_ar_with(plan, req, limits, &mut |_| true).await
}

/// [`generate_ar`], handing each byte to `on_byte` as soon as it is sampled (for
/// streaming). `on_byte` returns whether to go on: `false` ends the generation early
/// (a stop sequence matched, or the reader went away) and the bytes so far are returned.
pub async fn generate_ar_with(
    plan: &Plan,
    req: &Request,
    limits: &HopLimits,
    on_byte: &mut (dyn FnMut(u8) -> bool + Send),
) -> Result<Generation, ServeError> {
    check_request(plan, req)?;
    let window = plan.window as usize;
    let first = &plan.stages[0];
    let addr = first.replicas[0].clone();
    let net = |m: String| ServeError::Network(format!("AR stage {}: {m}", first.blocks));
    // The AR network reads MASK as its start-of-text token, then the prompt.
    let mut ids: Vec<u16> = std::iter::once(MASK_TOKEN)
        .chain(req.prompt.iter().map(|&b| b as u16))
        .collect();
    let mut start = ids.len().saturating_sub(window); // id at the caches' position 0
    let mut cached = 0; // positions the servers' caches hold in this session
    let mut stream: Option<TcpStream> = None;
    let mut session = 0;
    let mut output = Vec::with_capacity(req.len);
    let mut hops: Vec<HopStat> = Vec::new();
    let mut traversals = 0;
    let started = Instant::now();
    for i in 0..req.len {
        if ids.len() - start > window {
            start = ids.len() - window / 2;
            stream = None; // closing the connections ends the session and its caches
        }
        let s = match &mut stream {
            Some(s) => s,
            None => {
                let expect = Expect {
                    model_id: Some(&plan.model_id),
                    blocks: Some(first.blocks),
                    ..Expect::default()
                };
                let (s, _) = crate::hop::connect(&addr, limits, &expect)
                    .await
                    .map_err(|e| net(format!("{addr}: {e}")))?;
                session = rand::random::<u64>();
                cached = 0;
                stream.insert(s)
            }
        };
        let fresh = ids[start + cached..].to_vec();
        cached += fresh.len();
        let meta = ArStepMeta {
            session,
            output_index: i as u64,
            hidden: None,
            setup: (cached == fresh.len()).then(|| ArSetup {
                model_id: plan.model_id.clone(),
                sampling: req.sampling.clone(),
                seed: req.seed,
                route: plan.stages.clone(),
                hop: 0,
            }),
        };
        let step = Message::ArStep(meta, ArPayload::Tokens(fresh));
        timeout(limits.stall_timeout, write_message(s, &step))
            .await
            .map_err(|_| net(format!("{addr} stopped reading")))?
            .map_err(|e| net(format!("{addr}: {e}")))?;
        let reply = loop {
            match timeout(limits.stall_timeout, read_message(s, limits.max_frame)).await {
                Err(_) => return Err(net(format!("{addr} stalled"))),
                Ok(Err(e)) => return Err(net(format!("{addr}: {e}"))),
                Ok(Ok(Message::Keepalive)) => continue,
                Ok(Ok(m)) => break m,
            }
        };
        match reply {
            Message::ArOutput(o) => {
                output.push(o.byte);
                let go_on = on_byte(o.byte);
                ids.push(o.byte as u16);
                traversals += traversals_in(&o.hops, first);
                if hops.is_empty() {
                    hops = o.hops;
                } else {
                    for (sum, h) in hops.iter_mut().zip(&o.hops) {
                        sum.compute_ms += h.compute_ms;
                        sum.bytes_out += h.bytes_out;
                    }
                }
                if !go_on {
                    break;
                }
            }
            Message::Error(e) => return Err(stage_error(format!("AR step {i}"), &e)),
            other => {
                return Err(net(format!(
                    "unexpected {} frame",
                    crate::kind_name(&other)
                )))
            }
        }
    }
    Ok(Generation {
        output,
        hops,
        seconds: started.elapsed().as_secs_f64(),
        traversals,
        entry_failovers: 0,
    })
}
