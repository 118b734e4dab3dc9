//! `--registry URL`: block servers announce themselves to a coordinator
//! (`serve --registry`), and clients build their route from the live list
//! (`generate --registry`, `gateway --registry`). The coordinator's side is
//! `blocktrain_train::registry`; ranking replicas is `blocktrain_serve::rank`.
//!
//! The serve crate speaks no HTTP to coordinators (it links nothing of training), so
//! this glue lives here and uses the train crate's signed client. Here: the client side
//! (read the list, check each server's own answer, tile the blocks, rank); `announce`:
//! the server side.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use blocktrain_protocol::frame::{BlockRange, ServerInfo};
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::registry::ServerList;
use blocktrain_serve::client::{self, Plan};
use blocktrain_serve::hop::HopLimits;
use blocktrain_serve::rank::{order_replicas, Load};
use blocktrain_train::client::Client;
use blocktrain_train::tls::TlsTrust;
use clap::Args;

mod announce;
pub use announce::{announce_forever, AnnounceArgs};

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

pub(super) fn registry_client(
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
    for (c, _) in &kept {
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
    // The route is built from the answers already in hand: no server is asked twice.
    let mut answers = Vec::new();
    for (c, answer) in kept {
        match tiling.contains(&(c.blocks.first, c.blocks.last)) {
            true => answers.push(answer),
            false => left_out.push(format!(
                "{}: hosts blocks {}, not a stage of the chosen tiling",
                c.addr, c.blocks
            )),
        }
    }
    let mut plan = client::plan_from(answers)?;
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
/// announced, with their answers; the others are returned as why they were left out. A
/// lying or foreign announcement thus costs one greeting, never the route.
async fn verify(
    wanted: &Wanted,
    candidates: Vec<Candidate>,
    limits: &HopLimits,
) -> (Vec<(Candidate, client::Answered)>, Vec<String>) {
    let addrs: Vec<String> = candidates.iter().map(|c| c.addr.clone()).collect();
    let answers: BTreeMap<String, Result<(ServerInfo, f64), String>> =
        client::ask_all(&addrs, limits).await.into_iter().collect();
    let mut kept = Vec::new();
    let mut left_out = Vec::new();
    for c in candidates {
        let answer = answers
            .get(&c.addr)
            .cloned()
            .unwrap_or_else(|| Err("not asked".into()));
        match answer {
            Ok((i, ms))
                if i.model_id == wanted.model
                    && i.family == wanted.family
                    && i.total == wanted.total
                    && i.blocks == c.blocks =>
            {
                let addr = c.addr.clone();
                kept.push((c, (addr, Ok((i, ms)))))
            }
            Ok((i, _)) => left_out.push(format!(
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

#[cfg(test)]
mod tests {
    use super::*;
    use blocktrain_protocol::frame::BlockRange;
    use blocktrain_protocol::registry::Announcement;
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
