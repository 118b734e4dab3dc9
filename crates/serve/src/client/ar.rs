//! The AR pipeline's client: one traversal of the layer stack per output byte, over one
//! persistent connection per hop (the KV caches live with the connections), and
//! failover by replaying the context to replicas, as Petals does.
//!
//! The client holds the whole context (start token, prompt, bytes so far). When a stage
//! fails mid-session (unreachable, connection broken, stalled, past the hop call's
//! deadline however many keepalives it sent, or an `Unavailable`, `Internal`, `Busy` or
//! `Mismatch` error naming it), the replica serving it is given up on for the rest of
//! the generation and a new session is opened over the replicas left: its first step
//! re-prefills the context from the session's `start`, on every stage, and samples the
//! same output index, so the bytes do not change. Each failover gives up on at least
//! one replica, so a stage fails over at most (replicas - 1) times before the
//! generation ends with an error naming it.
//!
//! Log-probabilities ([`generate_ar_scored`]) are asked for in the session's setup and
//! computed by the last stage from the same logits it samples from; after a failover the
//! re-prefilled context gives the same values (to float rounding: a prefill sums in
//! another order than steps one by one). A last stage that answers without them (a
//! server from before them) is failed over like a broken one, so the error names it
//! when no replica has them.
use std::time::Instant;

use blocktrain_protocol::frame::{
    ArOutput, ArPayload, ArSetup, ArStepMeta, ByteLogprobs, ErrorCode, HopStat, Message, Stage,
    MASK_TOKEN, MAX_TOP_LOGPROBS,
};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{check_request, stage_error, traversals_in, Generation, Plan, Request};
use crate::framed::{read_message, write_message};
use crate::hop::{past_deadline, Expect, HopLimits};
use crate::ServeError;

/// The AR baseline: one traversal of the layer stack per output byte, over one
/// persistent connection per hop (the KV caches live with the connections).
///
/// Samples what [`blocktrain_model::sampler::generate_ar`] samples on one host: the
/// context starts as MASK + prompt cut to the model's window, and when it would outgrow
/// the window the session restarts (new connections, empty caches) from the last
/// `window / 2` ids, so positions stay inside what the model was trained on. A stage
/// that fails mid-generation costs a new session over its other replicas and a
/// re-prefill of the context, not the request (see the module docs).
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
    generate_ar_scored(plan, req, None, limits, &mut |b, _| on_byte(b)).await
}

/// [`generate_ar_with`], with the model's log-probabilities of every byte when
/// `logprobs` is `Some(n)`: the sampled byte's and the `n` most likely bytes' (at most
/// [`MAX_TOP_LOGPROBS`]), handed to `on_byte` with the byte and kept in
/// [`Generation::logprobs`].
pub async fn generate_ar_scored(
    plan: &Plan,
    req: &Request,
    logprobs: Option<u32>,
    limits: &HopLimits,
    on_byte: &mut (dyn FnMut(u8, Option<&ByteLogprobs>) -> bool + Send),
) -> Result<Generation, ServeError> {
    check_request(plan, req)?;
    if let Some(n) = logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
        return Err(ServeError::Config(format!(
            "logprobs: {n} alternatives asked for, the AR servers report at most {MAX_TOP_LOGPROBS}"
        )));
    }
    let window = plan.window as usize;
    // The AR network reads MASK as its start-of-text token, then the prompt.
    let mut ids: Vec<u16> = std::iter::once(MASK_TOKEN)
        .chain(req.prompt.iter().map(|&b| b as u16))
        .collect();
    let mut start = ids.len().saturating_sub(window); // id at the caches' position 0
    let mut replicas = Replicas::new(plan);
    let mut session: Option<Session> = None;
    let mut output = Vec::with_capacity(req.len);
    let mut scores = Vec::new();
    let mut hops: Vec<HopStat> = Vec::new();
    let (mut traversals, mut replayed) = (0, 0);
    let started = Instant::now();
    while output.len() < req.len {
        let i = output.len();
        if ids.len() - start > window {
            start = ids.len() - window / 2;
            session = None; // closing the connections ends the session and its caches
        }
        let s = match &mut session {
            Some(s) => s,
            None => session.insert(Session::open(plan, &mut replicas, limits).await?),
        };
        let first_step = s.cached == 0;
        let step = s.step(plan, req, logprobs, &ids[start..], i, limits).await;
        let step = match step {
            Ok(o) => {
                if first_step {
                    replicas.learn(&s.route, &o.hops);
                }
                // Checked once the replica serving the last stage is known (learned
                // from a session's first answer), so only that one is given up on.
                match scored(&o, logprobs) {
                    Ok(()) => Ok(o),
                    Err(why) => Err(Failure::Stage(plan.stages.len() - 1, why)),
                }
            }
            Err(f) => Err(f),
        };
        match step {
            Ok(o) => {
                output.push(o.byte);
                ids.push(o.byte as u16);
                traversals += traversals_in(&o.hops, &plan.stages[0]);
                add_hops(&mut hops, o.hops);
                let go_on = on_byte(o.byte, o.logprobs.as_ref());
                scores.extend(o.logprobs);
                if !go_on {
                    break;
                }
            }
            Err(Failure::Stage(k, why)) => {
                // On a session's first step the stage before tried every replica of
                // stage k in the route before reporting it, so all of them failed.
                let failed = match replicas.in_use.get(k).cloned().flatten() {
                    Some(addr) => vec![addr],
                    None => s.route.get(k).map_or(Vec::new(), |st| st.replicas.clone()),
                };
                tracing::warn!(stage = %plan.stages[k].blocks, ?failed, "AR failover: {why}");
                replicas.give_up(k, failed, &why);
                replayed += s.cached;
                session = None; // the next step opens a new one and re-prefills
            }
            Err(Failure::Final(e)) => return Err(e),
        }
    }
    Ok(Generation {
        output,
        hops,
        seconds: started.elapsed().as_secs_f64(),
        traversals,
        entry_failovers: replicas.failovers()[0],
        stage_failovers: replicas.failovers(),
        replayed_positions: replayed,
        logprobs: scores,
    })
}

/// Whether a step's answer carries the log-probabilities asked for (`want`: the
/// alternatives per byte), or why not. Their shape was checked by the decoder.
fn scored(o: &ArOutput, want: Option<u32>) -> Result<(), String> {
    let server = o.hops.last().map_or("?", |h| h.server.as_str());
    match (want, &o.logprobs) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err(format!("{server} sent log-probabilities nobody asked for")),
        (Some(_), None) => Err(format!(
            "{server} returned no log-probabilities (a server from before them?)"
        )),
        (Some(n), Some(lp)) if lp.top.len() != n as usize => Err(format!(
            "{server} returned {} alternatives per byte, {n} were asked for",
            lp.top.len()
        )),
        (Some(_), Some(_)) => Ok(()),
    }
}

/// Sums each stage's reports over steps (matched by blocks: after a failover another
/// replica reports for the stage, and is named).
fn add_hops(sums: &mut Vec<HopStat>, step: Vec<HopStat>) {
    for h in step {
        match sums.iter_mut().find(|s| s.blocks == h.blocks) {
            Some(sum) => {
                sum.compute_ms += h.compute_ms;
                sum.bytes_out += h.bytes_out;
                sum.failovers += h.failovers;
                sum.server = h.server;
            }
            None => sums.push(h),
        }
    }
}

/// How a step failed.
enum Failure {
    /// Stage `k` (plan order) failed in a way another replica may not: fail over.
    Stage(usize, String),
    /// The request is wrong, or any replica would fail the same way.
    Final(ServeError),
}

/// The replicas one generation has given up on, and who serves the current session.
struct Replicas<'a> {
    plan: &'a Plan,
    /// Per stage (plan order): replicas given up on, with why.
    failed: Vec<Vec<(String, String)>>,
    /// Per stage: the replica serving the current session, once known.
    in_use: Vec<Option<String>>,
}

impl<'a> Replicas<'a> {
    fn new(plan: &'a Plan) -> Self {
        Replicas {
            plan,
            failed: vec![Vec::new(); plan.stages.len()],
            in_use: vec![None; plan.stages.len()],
        }
    }

    /// The plan's stages less the replicas given up on (a new session's route), or an
    /// error naming the first stage with none left.
    fn route(&self) -> Result<Vec<Stage>, ServeError> {
        let mut route = Vec::with_capacity(self.plan.stages.len());
        for (stage, failed) in self.plan.stages.iter().zip(&self.failed) {
            let left: Vec<String> = stage
                .replicas
                .iter()
                .filter(|r| !failed.iter().any(|(f, _)| f == *r))
                .cloned()
                .collect();
            if left.is_empty() {
                let why: Vec<String> = failed.iter().map(|(a, w)| format!("{a}: {w}")).collect();
                return Err(ServeError::Network(format!(
                    "AR stage {}: no replica left of {} ({})",
                    stage.blocks,
                    stage.replicas.len(),
                    why.join("; ")
                )));
            }
            route.push(Stage {
                blocks: stage.blocks,
                replicas: left,
            });
        }
        Ok(route)
    }

    fn give_up(&mut self, stage: usize, addrs: Vec<String>, why: &str) {
        let Some(failed) = self.failed.get_mut(stage) else {
            return;
        };
        for addr in addrs {
            if !failed.iter().any(|(f, _)| *f == addr) {
                failed.push((addr, why.to_string()));
            }
        }
    }

    /// What a session's first answer says about who serves it: stage k's server reports
    /// how many replicas of stage k + 1 it passed over, in the route's order, before one
    /// answered; those are given up on too (the next session skips them).
    fn learn(&mut self, route: &[Stage], hops: &[HopStat]) {
        for (k, pair) in route.windows(2).enumerate() {
            let Some(h) = hops.iter().find(|h| h.blocks == pair[0].blocks) else {
                continue;
            };
            let skipped = h.failovers as usize;
            let Some(serving) = pair[1].replicas.get(skipped) else {
                continue; // a report that cannot be true: learn nothing from it
            };
            self.in_use[k + 1] = Some(serving.clone());
            let why = format!("passed over by the server of stage {}", pair[0].blocks);
            self.give_up(k + 1, pair[1].replicas[..skipped].to_vec(), &why);
        }
    }

    /// Replicas given up on per stage.
    fn failovers(&self) -> Vec<u32> {
        self.failed.iter().map(|f| f.len() as u32).collect()
    }
}

/// One AR session: the connection to the first stage's replica, and what it has cached.
struct Session {
    stream: TcpStream,
    id: u64,
    /// The route it was set up with (the plan less the replicas given up on then).
    route: Vec<Stage>,
    /// Positions the servers' caches hold.
    cached: usize,
    addr: String,
}

impl Session {
    /// Connects to the first stage's first replica left, giving up on those that do
    /// not answer.
    async fn open(
        plan: &Plan,
        replicas: &mut Replicas<'_>,
        limits: &HopLimits,
    ) -> Result<Session, ServeError> {
        loop {
            let route = replicas.route()?;
            let addr = route[0].replicas[0].clone(); // route() leaves every stage one
            let expect = Expect {
                model_id: Some(&plan.model_id),
                blocks: Some(route[0].blocks),
                ..Expect::default()
            };
            match crate::hop::connect(&addr, limits, &expect).await {
                Ok((stream, _)) => {
                    replicas.in_use = vec![None; route.len()];
                    replicas.in_use[0] = Some(addr.clone());
                    return Ok(Session {
                        stream,
                        id: rand::random::<u64>(),
                        route,
                        cached: 0,
                        addr,
                    });
                }
                Err(why) => replicas.give_up(0, vec![addr], &why),
            }
        }
    }

    /// Sends the positions of `context` (ids from the session's start) not yet cached,
    /// to sample output byte `index`, and reads the answer.
    async fn step(
        &mut self,
        plan: &Plan,
        req: &Request,
        logprobs: Option<u32>,
        context: &[u16],
        index: usize,
        limits: &HopLimits,
    ) -> Result<ArOutput, Failure> {
        let fresh = context.get(self.cached..).unwrap_or_default().to_vec();
        let meta = ArStepMeta {
            session: self.id,
            output_index: index as u64,
            hidden: None,
            setup: (self.cached == 0).then(|| ArSetup {
                model_id: plan.model_id.clone(),
                sampling: req.sampling.clone(),
                seed: req.seed,
                route: self.route.clone(),
                hop: 0,
                logprobs,
            }),
        };
        let n = fresh.len();
        let step = Message::ArStep(meta, ArPayload::Tokens(fresh));
        let addr = &self.addr;
        let broken = |why: String| Failure::Stage(0, format!("{addr}: {why}"));
        // The whole route's deadline, keepalives or not: a stage after the first that
        // stalls is given up on by the one before it first, and named.
        let deadline = limits.deadline(self.route.len());
        let stream = &mut self.stream;
        let exchange = async {
            match timeout(limits.stall_timeout, write_message(stream, &step)).await {
                Err(_) => return Err("stopped reading".to_string()),
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(_)) => {}
            }
            loop {
                let read = read_message(stream, limits.max_frame);
                match timeout(limits.stall_timeout, read).await {
                    Err(_) => return Err("stalled".to_string()),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Ok(Ok(Message::Keepalive)) => continue,
                    Ok(Ok(m)) => return Ok(m),
                }
            }
        };
        let reply = timeout(deadline, exchange)
            .await
            .unwrap_or_else(|_| Err(past_deadline(deadline)))
            .map_err(broken)?;
        match reply {
            Message::ArOutput(o) => {
                self.cached += n;
                Ok(o)
            }
            Message::Error(e) => {
                let stage = plan.stages.iter().position(|s| Some(s.blocks) == e.blocks);
                let replaceable = matches!(
                    e.code,
                    ErrorCode::Unavailable
                        | ErrorCode::Internal
                        | ErrorCode::Busy
                        | ErrorCode::Mismatch
                );
                match stage {
                    Some(k) if replaceable => Err(Failure::Stage(k, e.message)),
                    _ => Err(Failure::Final(stage_error(format!("AR step {index}"), &e))),
                }
            }
            other => Err(broken(format!(
                "unexpected {} frame",
                crate::kind_name(&other)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocktrain_protocol::frame::BlockRange;

    fn plan() -> Plan {
        let stage = |l: u32, replicas: &[&str]| Stage {
            blocks: BlockRange { first: l, last: l },
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
        };
        Plan {
            model_id: "m".into(),
            family: "ar".into(),
            total: 2,
            stages: vec![stage(1, &["a"]), stage(2, &["b", "c"])],
            max_tokens: 64,
            window: 32,
            unreachable: Vec::new(),
            latency_ms: Default::default(),
        }
    }

    fn report(layer: u32, failovers: u32) -> HopStat {
        HopStat {
            blocks: BlockRange {
                first: layer,
                last: layer,
            },
            server: "x".into(),
            compute_ms: 0.0,
            failovers,
            bytes_out: 0,
        }
    }

    #[test]
    fn a_replica_passed_over_is_given_up_on_and_the_next_route_skips_it() {
        let plan = plan();
        let mut r = Replicas::new(&plan);
        let route = r.route().unwrap();
        r.learn(&route, &[report(1, 1), report(2, 0)]);
        assert_eq!(r.in_use[1].as_deref(), Some("c"));
        assert_eq!(r.failovers(), vec![0, 1]);
        assert_eq!(r.route().unwrap()[1].replicas, vec!["c".to_string()]);
        // Giving up on the last one ends the generation with the stage named.
        r.give_up(1, vec!["c".into()], "connection closed");
        let e = r.route().unwrap_err().to_string();
        assert!(e.contains("AR stage 2..2: no replica left of 2"), "{e}");
        assert!(e.contains("c: connection closed"), "{e}");
    }

    #[test]
    fn a_report_that_cannot_be_true_teaches_nothing() {
        let plan = plan();
        let mut r = Replicas::new(&plan);
        let route = r.route().unwrap();
        // A hostile first stage claims it passed over more replicas than exist.
        r.learn(&route, &[report(1, u32::MAX), report(7, 3)]);
        assert_eq!(r.in_use[1], None);
        assert_eq!(r.failovers(), vec![0, 0]);
        assert_eq!(r.route().unwrap()[1].replicas.len(), 2);
    }
}
