//! `--registry URL`: block servers announce themselves to a coordinator
//! (`serve --registry`), and clients build their route from the live list
//! (`generate --registry`, `gateway --registry`). The coordinator's side is
//! `blocktrain_train::registry`; ranking replicas is `blocktrain_serve::rank`.
//!
//! The serve crate speaks no HTTP to coordinators (it links nothing of training), so
//! this glue lives here and uses the train crate's signed client.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blocktrain_protocol::frame::{BlockRange, ServerInfo};
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::registry::{Announcement, ServerList};
use blocktrain_protocol::wire::join_proof;
use blocktrain_serve::client::{self, Plan};
use blocktrain_serve::hop::HopLimits;
use blocktrain_serve::rank::{order_replicas, Load};
use blocktrain_train::client::Client;
use blocktrain_train::tls::TlsTrust;
use clap::Args;

/// How long a client keeps retrying an unreachable registry.
const FETCH_RETRY: Duration = Duration::from_secs(10);

/// Flags of a client that builds its route from a registry.
#[derive(Args, Debug, Clone)]
pub struct RegistryClientArgs {
    /// Build the route from the block servers announced to this coordinator
    /// (`http(s)://host:port`) instead of a route file: replicas ranked by measured
    /// round trip and announced load.
    #[arg(long, conflicts_with = "route")]
    pub registry: Option<String>,
    /// With --registry: the model to route to (default: the one model whose blocks the
    /// live servers all cover).
    #[arg(long, requires = "registry")]
    pub model: Option<String>,
    /// With an https:// registry: trust its certificate only with this SHA-256
    /// fingerprint (a self-signed coordinator prints it at start-up).
    #[arg(long, requires = "registry", conflicts_with = "registry_tls_ca")]
    pub registry_tls_fingerprint: Option<String>,
    /// With an https:// registry: trust its certificate only if this CA (PEM) issued it.
    #[arg(long, requires = "registry")]
    pub registry_tls_ca: Option<PathBuf>,
}

/// Flags of `serve` for announcing to a registry.
#[derive(Args, Debug, Clone)]
pub struct AnnounceArgs {
    /// Announce this server to the coordinator at this URL, renewed every
    /// --announce-every seconds (it expires from the list when the renewals stop).
    #[arg(long)]
    pub registry: Option<String>,
    /// With --registry: the address clients dial (default: the listen address; required
    /// when listening on 0.0.0.0 or ::).
    #[arg(long, requires = "registry")]
    pub public_addr: Option<String>,
    /// With --registry: the coordinator's run join secret, when the run has one and this
    /// server's key (--key) is not a registered worker's. (--join-secret-file is another
    /// secret: the one this server asks of its own clients.)
    #[arg(long, env = "BLOCKTRAIN_JOIN_SECRET", requires = "registry")]
    pub registry_join_secret: Option<String>,
    /// With --registry: seconds between announcements (each lives 3 times as long).
    #[arg(long, default_value_t = 10.0, requires = "registry")]
    pub announce_every: f64,
    /// With an https:// registry: its certificate's SHA-256 fingerprint.
    #[arg(long, requires = "registry", conflicts_with = "registry_tls_ca")]
    pub registry_tls_fingerprint: Option<String>,
    /// With an https:// registry: the CA (PEM) that issued its certificate.
    #[arg(long, requires = "registry")]
    pub registry_tls_ca: Option<PathBuf>,
}

fn registry_client(
    url: &str,
    id: Identity,
    fingerprint: Option<&str>,
    ca: Option<&std::path::Path>,
) -> Result<Client> {
    let trust = TlsTrust::from_flags(fingerprint, ca)?;
    Ok(Client::with_trust(url, id, &trust)?.for_heartbeats(FETCH_RETRY))
}

/// The live servers of the registry (of `model`, when given).
pub fn fetch(args: &RegistryClientArgs) -> Result<ServerList> {
    let url = args.registry.as_deref().context("no --registry given")?;
    // The list is public; the request is signed by a throwaway key (the client signs
    // everything), which the coordinator does not need to know.
    let mut c = registry_client(
        url,
        Identity::generate(),
        args.registry_tls_fingerprint.as_deref(),
        args.registry_tls_ca.as_deref(),
    )?;
    let path = match &args.model {
        Some(m) => format!("/v1/servers?model={}", urlencode(m)),
        None => "/v1/servers".to_string(),
    };
    c.get_json(&path)
        .with_context(|| format!("reading the server list of {url}"))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A listed server of the chosen model: where, and what it announced it hosts.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// `host:port`.
    pub addr: String,
    /// The blocks it announced.
    pub blocks: BlockRange,
}

/// What a route over the registry's servers must be: the model and its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Wanted {
    /// Model id.
    pub model: String,
    /// Its family.
    pub family: String,
    /// Its blocks.
    pub total: u32,
}

/// The model to route to, its listed servers and their loads: `model` when given, else
/// the one model the live servers cover fully.
pub fn choose(
    list: &ServerList,
    model: Option<&str>,
) -> Result<(Wanted, Vec<Candidate>, BTreeMap<String, Load>)> {
    let full: Vec<&str> = list
        .models
        .iter()
        .filter(|m| m.gaps.is_empty())
        .map(|m| m.model_id.as_str())
        .collect();
    let chosen = match model {
        Some(m) => {
            let Some(cov) = list.models.iter().find(|c| c.model_id == m) else {
                bail!("the registry has no live server of model {m}");
            };
            if !cov.gaps.is_empty() {
                let gaps: Vec<String> = cov.gaps.iter().map(|g| g.to_string()).collect();
                bail!(
                    "no live server of model {m} hosts blocks {} (see the coordinator's dashboard)",
                    gaps.join(", ")
                );
            }
            m.to_string()
        }
        None => match full.as_slice() {
            [one] => one.to_string(),
            [] if list.models.is_empty() => bail!("the registry lists no live servers"),
            [] => {
                let each: Vec<String> = list
                    .models
                    .iter()
                    .map(|m| {
                        let g: Vec<String> = m.gaps.iter().map(|g| g.to_string()).collect();
                        format!("{} lacks blocks {}", m.model_id, g.join(", "))
                    })
                    .collect();
                bail!("no model's blocks are all served: {}", each.join("; "))
            }
            many => bail!(
                "the registry serves {} complete models ({}): choose one with --model",
                many.len(),
                many.join(", ")
            ),
        },
    };
    let cov = list
        .models
        .iter()
        .find(|c| c.model_id == chosen)
        .context("the chosen model has a coverage entry")?;
    let wanted = Wanted {
        model: chosen.clone(),
        family: cov.family.clone(),
        total: cov.total,
    };
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut loads = BTreeMap::new();
    // Newest announcement first: for an address listed twice, the newest figures count.
    for e in list
        .servers
        .iter()
        .filter(|e| e.announcement.model_id == chosen)
    {
        let a = &e.announcement;
        let c = Candidate {
            addr: a.addr.clone(),
            blocks: a.blocks,
        };
        if !candidates.contains(&c) {
            candidates.push(c);
        }
        loads.entry(a.addr.clone()).or_insert(Load {
            passes_per_s: a.passes_per_s,
            pass_ms: a.pass_ms,
        });
    }
    Ok((wanted, candidates, loads))
}

/// A tiling of blocks `1..=total` by `ranges` (each with its replica count), preferring
/// the tiling whose thinnest stage has the most replicas, then the one with fewer
/// stages. None when the ranges cannot tile the model.
pub fn tile(ranges: &BTreeMap<(u32, u32), usize>, total: u32) -> Option<Vec<(u32, u32)>> {
    let n = total as usize;
    // best[b]: from block b on, (thinnest stage's replicas, -stages, first range).
    type Best = Option<(usize, i64, (u32, u32))>;
    let mut best: Vec<Best> = vec![None; n + 2];
    let end = (usize::MAX, 0, (0, 0));
    best[n + 1] = Some(end);
    for b in (1..=n).rev() {
        for (&(first, last), &count) in ranges.range((b as u32, 0)..(b as u32 + 1, 0)) {
            if first as usize != b || last < first || last as usize > n {
                continue;
            }
            let Some((thin, stages, _)) = best[last as usize + 1] else {
                continue;
            };
            let cand = (thin.min(count), stages - 1, (first, last));
            if best[b].is_none_or(|cur| (cand.0, cand.1) > (cur.0, cur.1)) {
                best[b] = Some(cand);
            }
        }
    }
    let mut out = Vec::new();
    let mut b = 1usize;
    while b <= n {
        let (_, _, r) = best[b]?;
        out.push(r);
        b = r.1 as usize + 1;
    }
    Some(out)
}

/// The route from the registry: its live servers of the chosen model, each asked what
/// it hosts over the wire, replicas ranked by round trip and load.
pub async fn plan(args: &RegistryClientArgs, limits: &HopLimits) -> Result<Plan> {
    let fetch_args = args.clone();
    let list = tokio::task::spawn_blocking(move || fetch(&fetch_args))
        .await
        .context("registry task")??;
    let (wanted, candidates, loads) = choose(&list, args.model.as_deref())?;
    let (kept, mut left_out) = verify(&wanted, candidates, limits).await;
    let mut ranges: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    for c in &kept {
        *ranges.entry((c.blocks.first, c.blocks.last)).or_default() += 1;
    }
    let Some(tiling) = tile(&ranges, wanted.total) else {
        bail!(
            "the servers of model {} that answer as announced do not cover its {} blocks{}",
            wanted.model,
            wanted.total,
            match left_out.is_empty() {
                true => String::new(),
                false => format!(" (left out: {})", left_out.join("; ")),
            }
        );
    };
    let mut addrs = Vec::new();
    for c in kept {
        match tiling.contains(&(c.blocks.first, c.blocks.last)) {
            true => addrs.push(c.addr),
            false => left_out.push(format!(
                "{}: hosts blocks {}, not a stage of the chosen tiling",
                c.addr, c.blocks
            )),
        }
    }
    let mut plan = client::discover(&addrs, limits).await?;
    if plan.model_id != wanted.model {
        bail!(
            "the registry lists model {}, but its servers answer for {}",
            wanted.model,
            plan.model_id
        );
    }
    plan.unreachable.extend(left_out);
    order_replicas(&mut plan, &loads);
    Ok(plan)
}

/// Asks every candidate what it hosts (its greeting; no Hello is signed for it) and
/// keeps those that answer for the wanted model, family and size with the blocks they
/// announced; the others are returned as why they were left out. A lying or foreign
/// announcement thus costs one greeting, never the route.
async fn verify(
    wanted: &Wanted,
    candidates: Vec<Candidate>,
    limits: &HopLimits,
) -> (Vec<Candidate>, Vec<String>) {
    let mut asks = tokio::task::JoinSet::new();
    for (i, c) in candidates.iter().enumerate() {
        let (addr, limits) = (c.addr.clone(), limits.clone());
        asks.spawn(async move { (i, client::server_info(&addr, &limits).await) });
    }
    let mut answers: Vec<Option<Result<ServerInfo, String>>> = vec![None; candidates.len()];
    while let Some(done) = asks.join_next().await {
        if let Ok((i, a)) = done {
            answers[i] = Some(a);
        }
    }
    let mut kept = Vec::new();
    let mut left_out = Vec::new();
    for (c, answer) in candidates.into_iter().zip(answers) {
        match answer.unwrap_or_else(|| Err("the check failed".into())) {
            Ok(i)
                if i.model_id == wanted.model
                    && i.family == wanted.family
                    && i.total == wanted.total
                    && i.blocks == c.blocks =>
            {
                kept.push(c)
            }
            Ok(i) => left_out.push(format!(
                "{}: announced {} blocks {} of {}, answers for {} {} blocks {} of {}",
                c.addr,
                wanted.model,
                c.blocks,
                wanted.total,
                i.family,
                i.model_id,
                i.blocks,
                i.total
            )),
            Err(e) => left_out.push(format!("{}: {e}", c.addr)),
        }
    }
    (kept, left_out)
}

/// Announces the server at `own` (which hosts `info`, with key `id`) to the registry
/// until the task is dropped: every `announce_every` seconds, with the passes per second
/// and mean pass time measured since the last announcement (asked of the server itself).
pub async fn announce_forever(
    args: AnnounceArgs,
    own: String,
    info: ServerInfo,
    id: Identity,
    limits: HopLimits,
) -> Result<()> {
    let Some(url) = args.registry.clone() else {
        return Ok(());
    };
    let public = match &args.public_addr {
        Some(a) => a.clone(),
        None => own.clone(),
    };
    blocktrain_protocol::registry::check_addr(&public)
        .map_err(|e| anyhow::anyhow!("serve --registry: {e} (give --public-addr host:port)"))?;
    let proof = args
        .registry_join_secret
        .as_deref()
        .map(|s| join_proof(s, &id.public_hex()));
    // reqwest's blocking client runs a runtime of its own: it is made, used and dropped
    // on the blocking pool, never in this async task.
    let (u, fp, ca) = (
        url.clone(),
        args.registry_tls_fingerprint.clone(),
        args.registry_tls_ca.clone(),
    );
    let mut c = tokio::task::spawn_blocking(move || {
        registry_client(&u, id, fp.as_deref(), ca.as_deref()).map(|c| OffRuntime(Some(c)))
    })
    .await
    .context("registry client")??;
    let every = Duration::from_secs_f64(args.announce_every.clamp(1.0, 200.0));
    let ttl_secs = (3.0 * every.as_secs_f64()).ceil().clamp(5.0, 600.0) as u32;
    let mut last: Option<(Instant, u64, Option<f64>)> = None;
    // What the last reading gave: passes, passes per second, ms per pass.
    let mut figures: (u64, f64, Option<f64>) = (0, 0.0, None);
    let mut announced = false;
    loop {
        // Its own counters. When they cannot be read this time, the last figures are
        // announced again and the interval goes on: a reading of 0 passes would make
        // the next one count every pass since start as one interval's.
        if let Ok(now) = client::server_info(&own, &limits).await {
            let (served, busy_ms) = busy_of(&now);
            let (passes_per_s, pass_ms) = match last {
                Some((t, s0, b0)) if served >= s0 => {
                    let dt = t.elapsed().as_secs_f64().max(1e-3);
                    let n = served - s0;
                    // The recent mean while it works; idle, its mean since start.
                    let pass = match (busy_ms, b0) {
                        (Some(b), Some(b0)) if n > 0 => Some((b - b0).max(0.0) / n as f64),
                        (Some(b), _) if served > 0 => Some(b / served as f64),
                        _ => None,
                    };
                    (n as f64 / dt, pass)
                }
                _ => (
                    0.0,
                    busy_ms.filter(|_| served > 0).map(|b| b / served as f64),
                ),
            };
            last = Some((Instant::now(), served, busy_ms));
            figures = (served, passes_per_s, pass_ms);
        }
        let (served, passes_per_s, pass_ms) = figures;
        let a = Announcement {
            model_id: info.model_id.clone(),
            family: info.family.clone(),
            blocks: info.blocks,
            total: info.total,
            addr: public.clone(),
            served,
            passes_per_s,
            pass_ms,
            ttl_secs,
            join_proof: proof.clone(),
        };
        let (back, sent) = tokio::task::spawn_blocking(move || {
            let r: blocktrain_train::Result<serde_json::Value> =
                c.0.as_mut()
                    .expect("held until dropped")
                    .post_json("/v1/servers/announce", &a);
            (c, r)
        })
        .await
        .context("announce task")?;
        c = back;
        match sent {
            Ok(_) if !announced => {
                eprintln!("announced to {url} as {public} (renewed every {every:?})");
                announced = true;
            }
            Ok(_) => {}
            // Not admitted is a configuration error: say so and stop. Anything else (a
            // full registry, a conflict, the network) may pass: retried at the next renewal.
            Err(
                e @ (blocktrain_train::NodeError::Forbidden(_)
                | blocktrain_train::NodeError::Unauthenticated(_)),
            ) if !announced => bail!("the registry at {url} refused this server: {e}"),
            Err(e) => eprintln!("warning: announcing to {url}: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// The blocking client, dropped on a thread of its own: dropping it inside an async
/// task (the announcer stopped by Ctrl-C) would panic.
struct OffRuntime(Option<Client>);

impl Drop for OffRuntime {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            std::thread::spawn(move || drop(c));
        }
    }
}

/// A server's passes and the milliseconds they took.
fn busy_of(i: &ServerInfo) -> (u64, Option<f64>) {
    (i.served, Some(i.busy_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocktrain_protocol::frame::BlockRange;
    use blocktrain_protocol::registry::{BlockCoverage, ModelCoverage, ServerEntry};

    fn entry(model: &str, addr: &str) -> ServerEntry {
        ServerEntry {
            key: "k".into(),
            announcement: Announcement {
                model_id: model.into(),
                family: "block".into(),
                blocks: BlockRange { first: 1, last: 1 },
                total: 1,
                addr: addr.into(),
                served: 0,
                passes_per_s: 2.0,
                pass_ms: Some(10.0),
                ttl_secs: 30,
                join_proof: None,
            },
            age_ms: 0,
            expires_in_ms: 30_000,
        }
    }

    fn cov(model: &str, gap: bool) -> ModelCoverage {
        ModelCoverage {
            model_id: model.into(),
            family: "block".into(),
            total: 1,
            blocks: vec![BlockCoverage {
                block: 1,
                servers: u32::from(!gap),
            }],
            gaps: match gap {
                true => vec![BlockRange { first: 1, last: 1 }],
                false => vec![],
            },
        }
    }

    #[test]
    fn the_one_complete_model_is_chosen_and_gaps_are_named() {
        let list = ServerList {
            servers: vec![entry("a", "h1:1"), entry("b", "h2:1")],
            models: vec![cov("a", false), cov("b", true)],
        };
        let (m, cands, loads) = choose(&list, None).unwrap();
        let addrs: Vec<&str> = cands.iter().map(|c| c.addr.as_str()).collect();
        assert_eq!((m.model.as_str(), addrs), ("a", vec!["h1:1"]));
        assert_eq!(loads["h1:1"].pass_ms, Some(10.0));
        let e = choose(&list, Some("b")).unwrap_err().to_string();
        assert!(e.contains("hosts blocks 1"), "{e}");
        let e = choose(&list, Some("zzz")).unwrap_err().to_string();
        assert!(e.contains("no live server of model zzz"), "{e}");
        let two = ServerList {
            servers: vec![entry("a", "h1:1"), entry("b", "h2:1")],
            models: vec![cov("a", false), cov("b", false)],
        };
        let e = choose(&two, None).unwrap_err().to_string();
        assert!(e.contains("--model"), "{e}");
        assert_eq!(choose(&two, Some("b")).unwrap().1[0].addr, "h2:1");
        let empty = ServerList {
            servers: vec![],
            models: vec![],
        };
        assert!(choose(&empty, None).is_err());
    }

    #[test]
    fn a_tiling_prefers_the_best_replicated_stages_and_fails_on_a_gap() {
        let r = |v: &[((u32, u32), usize)]| v.iter().copied().collect::<BTreeMap<_, _>>();
        // 1..2 (1 replica) or 1..1 + 2..2 (2 each), then 3..3 (1): both tilings' thinnest
        // stage has 1 replica, so the one with fewer stages wins.
        let ranges = r(&[((1, 2), 1), ((1, 1), 2), ((2, 2), 2), ((3, 3), 1)]);
        assert_eq!(tile(&ranges, 3), Some(vec![(1, 2), (3, 3)]));
        // A lone (perhaps hostile) 1..3 loses to stages with 2 replicas each; with 1 each
        // it wins on stage count.
        let ranges = r(&[((1, 3), 1), ((1, 1), 2), ((2, 2), 2), ((3, 3), 2)]);
        assert_eq!(tile(&ranges, 3), Some(vec![(1, 1), (2, 2), (3, 3)]));
        let ranges = r(&[((1, 3), 1), ((1, 1), 1), ((2, 2), 1), ((3, 3), 1)]);
        assert_eq!(tile(&ranges, 3), Some(vec![(1, 3)]));
        // Overlaps no longer stop a route: 1..2 and 2..3 overlap, 3..3 completes 1..2.
        let ranges = r(&[((1, 2), 1), ((2, 3), 1), ((3, 3), 1)]);
        assert_eq!(tile(&ranges, 3), Some(vec![(1, 2), (3, 3)]));
        assert_eq!(tile(&r(&[((1, 1), 1), ((3, 3), 1)]), 3), None);
        assert_eq!(tile(&r(&[((1, 4), 1)]), 3), None);
    }

    #[test]
    fn model_ids_are_escaped_in_the_query() {
        assert_eq!(urlencode("m-1.a_b~"), "m-1.a_b~");
        assert_eq!(urlencode("a&b=c d"), "a%26b%3Dc%20d");
    }
}
