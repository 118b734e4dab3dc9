//! `blocktrain bench inference`: latency per full output and bytes per traversal,
//! BlockTrain's one-traversal diffusion vs an autoregressive pipeline, both over the
//! same hosts, links and framing.
//!
//! Three hosts (one per block; the AR reference's layers split evenly over the same
//! three). With `--hosts netns` each server runs in its own network namespace
//! (`scripts/wan-hosts`: tbf at the link's rate on both ends of each host's veth) and
//! every hop crosses a user-space link that adds the one-way delay (this kernel has no
//! netem). With `--hosts loopback` the links do delay and rate on loopback. Either way
//! the hops are: client -> host 3 -> host 2 -> host 1, and the answer comes back the same
//! way, so one traversal costs 6 one-way delays plus compute.
//!
//! Systems: `blocktrain` (masked diffusion blocks: bytes + a mask bitmap cross a hop),
//! `edm` (the paper's embedding diffusion: the f16 latent, positions x `--embed-dim`,
//! crosses a hop) and `ar` (the pipeline).
//!
//! Weights: random ones of `--shape` by default (serving cost does not depend on their
//! values), or trained runs with `--checkpoint` / `--ar-checkpoint` (/ `--edm-checkpoint`).
//! With random weights, `--total-layers N` sets the model's depth (split over the hosts as
//! evenly as possible, host k holding the same number of layer applications in every
//! system), and a shape with `tie=K` shares one physical layer among K applications, so a
//! depth whose weights would not fit in memory runs at its full compute per token.
//!
//! Every link charges a new connection one round trip before its first byte (the TCP
//! handshake), so a hop that opens a connection per request pays it on every traversal
//! and a persistent one (the AR session's) once.
//!
//! `--clients 1,4,16` runs each system under N concurrent clients, each sending its
//! requests back to back (`load`): requests/s, p50 and p99 per request (and per token for
//! the AR pipeline), and whether throughput grows with N while p99 at N = 4 stays below 3x
//! the one-client p99. One client is always measured (the latency table is its run).
//!
//! `--max-batch 1,8` deploys the diffusion systems once per value (`serve --max-batch`,
//! with `--batch-window-ms`; 1 computes every request alone) and measures each client
//! count against each, side by side in one run; the AR pipeline is deployed once (its
//! steps are never batched). Each run reports the mean batch the servers computed.
//!
//! Files: this one (flags, the report), `deploy` (servers, links, route), `sources`
//! (what each host serves), `load` (the clients and their timing).
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use blocktrain_model::logical::LogicalShape;
use blocktrain_protocol::frame::Sampling;
use blocktrain_serve::client::Request;
use blocktrain_serve::hop::HopLimits;
use blocktrain_serve::server::MAX_BATCH_LIMIT;
use blocktrain_wanlink::LinkSpec;
use clap::Args;
use serde_json::json;

use crate::args::DeviceArgs;
use crate::cmd::bench_network::Hosts;

mod deploy;
mod load;
mod sources;
use deploy::{deploy, Deployment};
use load::{run_load, Load};
use sources::sources;

const HOSTS: u32 = 3;

/// Flags of `blocktrain bench inference`.
#[derive(Args, Debug)]
pub struct BenchInferenceArgs {
    /// Where the three servers run (netns needs root; falls back to loopback and says so).
    #[arg(long, value_enum, default_value = "netns")]
    pub hosts: Hosts,
    /// Each hop's emulated link, DELAY[,RATE] each way.
    #[arg(long, default_value = "25ms,100mbit")]
    pub link: LinkSpec,
    /// Output lengths in bytes.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    pub lens: Vec<usize>,
    /// Shape of one diffusion block (random weights); the AR reference gets 3x its layers.
    /// `tie=K` ties K consecutive layer applications to one physical layer (see
    /// `--total-layers`).
    #[arg(long, default_value = "d=128,layers=2,heads=4,dtype=f32,window=128")]
    pub shape: LogicalShape,
    /// With random weights: layer applications in the whole model (default 3x the shape's
    /// `layers`), split over the 3 hosts as evenly as possible (the hosts a traversal
    /// reaches first take the extra ones: 95 is 32 + 32 + 31), the same per host for the
    /// diffusion blocks and the AR pipeline.
    #[arg(long, conflicts_with = "checkpoint")]
    pub total_layers: Option<u32>,
    /// Trained block run (3 blocks) to serve instead of random weights.
    #[arg(long, requires = "ar_checkpoint")]
    pub checkpoint: Option<PathBuf>,
    /// Trained AR run (layers divisible by 3) to serve instead of random weights.
    #[arg(long, requires = "checkpoint")]
    pub ar_checkpoint: Option<PathBuf>,
    /// Trained edm run (3 blocks) to serve with the checkpoints above.
    #[arg(long, requires = "checkpoint")]
    pub edm_checkpoint: Option<PathBuf>,
    /// Latent width of the edm system's random weights.
    #[arg(long, default_value_t = blocktrain_model::config::EdmConfig::default().embed_dim)]
    pub embed_dim: i64,
    /// Denoising steps each block takes.
    #[arg(long, default_value_t = blocktrain_model::sampler::DEFAULT_STEPS_PER_BLOCK as u32)]
    pub steps_per_block: u32,
    /// Timed BlockTrain requests per length and client (one client's median is the
    /// latency table's figure).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Timed AR generations per length and client (each already averages over one
    /// traversal per byte).
    #[arg(long, default_value_t = 1)]
    pub ar_reps: usize,
    /// Concurrent clients to measure each system under, e.g. `1,4,16`: each client (its
    /// own connections) sends its `--reps` (AR: `--ar-reps`) requests back to back. One
    /// client is always measured.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub clients: Vec<usize>,
    /// The block servers' `serve --max-batch`, e.g. `1,8`: the diffusion systems are
    /// deployed once per value and every client count is measured against each, side by
    /// side (1: every request computed alone, batching off). The AR pipeline is deployed
    /// once: its steps are never batched. Each value deploys its own three servers.
    #[arg(long, value_delimiter = ',', default_value = "8")]
    pub max_batch: Vec<usize>,
    /// The block servers' `serve --batch-window-ms`.
    #[arg(long, default_value_t = 1.0)]
    pub batch_window_ms: f64,
    /// Systems to measure (deploying only these saves memory at large shapes).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "blocktrain,ar"
    )]
    pub systems: Vec<System>,
    /// Skip the AR pipeline at lengths above this (it costs one WAN round trip per byte).
    #[arg(long, default_value_t = 4096)]
    pub ar_max_len: usize,
    /// Prompt bytes.
    #[arg(long, default_value = "The ")]
    pub prompt: String,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-inference.json")]
    pub json: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    /// One-traversal masked block diffusion.
    Blocktrain,
    /// One-traversal embedding diffusion (the paper's family): the latent crosses hops.
    Edm,
    /// The autoregressive pipeline baseline.
    Ar,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Blocktrain => "blocktrain",
            System::Edm => "edm",
            System::Ar => "ar",
        }
    }
}

/// A system as deployed: the diffusion systems' servers batch up to `max_batch`
/// requests; None for the AR pipeline (its steps are never batched).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Setup {
    pub(super) system: System,
    pub(super) max_batch: Option<usize>,
}

impl Setup {
    /// Its key in the JSON rows: the system's name, with its batch setting when the run
    /// compares several.
    fn key(self, several: bool) -> String {
        match self.max_batch {
            Some(n) if several => format!("{}@max_batch={n}", self.system.name()),
            _ => self.system.name().to_string(),
        }
    }

    /// Its `max batch` table cell.
    pub(super) fn batch_cell(self) -> String {
        self.max_batch.map_or("-".into(), |n| n.to_string())
    }
}

/// Runs the benchmark.
pub fn run(args: BenchInferenceArgs) -> Result<()> {
    if args.lens.is_empty() || args.lens.contains(&0) {
        bail!("--lens must list positive lengths");
    }
    let mut hosts = args.hosts;
    if hosts == Hosts::Netns {
        let rate = args
            .link
            .rate_bits_per_s
            .map_or("10gbit".to_string(), |r| format!("{}kbit", r / 1000));
        let up = Command::new("scripts/wan-hosts")
            .args(["up", &HOSTS.to_string(), &rate])
            .status();
        if !matches!(up, Ok(s) if s.success()) {
            println!("note: network namespaces are not available here; running on loopback behind user-space links (delay and rate)");
            hosts = Hosts::Loopback;
        }
    }
    let setup = match hosts {
        Hosts::Netns => format!("3 netns hosts; {}: delay from a user-space link per hop, rate from tbf on each host's veth (both directions)", args.link),
        Hosts::Loopback => format!("3 servers on loopback; {} per hop from user-space links (delay and rate)", args.link),
    };
    let result = bench(&args, hosts, &setup);
    if hosts == Hosts::Netns {
        let _ = Command::new("scripts/wan-hosts")
            .args(["down", &HOSTS.to_string()])
            .status();
    }
    result
}

fn bench(args: &BenchInferenceArgs, hosts: Hosts, setup: &str) -> Result<()> {
    let limits = HopLimits {
        stall_timeout: std::time::Duration::from_secs(120),
        ..HopLimits::default()
    };
    let sources = sources(args)?;
    println!(
        "== bench inference: {setup}\n   weights: {}; {} steps per block",
        sources.weights, args.steps_per_block
    );
    if args.systems.contains(&System::Edm) && sources.edm.is_empty() {
        bail!("--systems edm with trained weights needs --edm-checkpoint");
    }
    let batches = batch_settings(args)?;
    let several = batches.len() > 1;
    println!(
        "   block servers: --max-batch {} --batch-window-ms {} (1: batching off); AR steps are never batched",
        batches.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
        args.batch_window_ms
    );
    let mut deployed: Vec<(Setup, Deployment)> = Vec::new();
    for &system in &args.systems {
        let src = match system {
            System::Blocktrain => &sources.diffusion,
            System::Edm => &sources.edm,
            System::Ar if args.lens.iter().any(|&l| l <= args.ar_max_len) => &sources.ar,
            System::Ar => continue,
        };
        let settings: Vec<Option<usize>> = match system {
            System::Ar => vec![None],
            _ => batches.iter().copied().map(Some).collect(),
        };
        for max_batch in settings {
            let setup = Setup { system, max_batch };
            if deployed.iter().any(|(s, _)| *s == setup) {
                continue;
            }
            let extra: Vec<String> = max_batch.map_or_else(Vec::new, |n| {
                vec![
                    "--max-batch".into(),
                    n.to_string(),
                    "--batch-window-ms".into(),
                    args.batch_window_ms.to_string(),
                ]
            });
            let d = deploy(hosts, args.link, src, &extra, &args.device, &limits)?;
            deployed.push((setup, d));
        }
    }
    let request = |len: usize| Request {
        prompt: args.prompt.as_bytes().to_vec(),
        len,
        sampling: Sampling {
            steps_per_block: args.steps_per_block,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            heun: false,
        },
        seed: 0,
    };
    let mut clients = args.clients.clone();
    clients.push(1);
    clients.sort_unstable();
    clients.dedup();
    if clients.contains(&0) {
        bail!("--clients must list positive counts");
    }
    let mut rows = Vec::new();
    let mut loads: Vec<(usize, Setup, Vec<Load>)> = Vec::new();
    println!("\n| output bytes | system | max batch | latency s | vs AR pipeline | bytes/traversal | traversals | compute s |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for &len in &args.lens {
        let mut results: Vec<(Setup, Vec<Load>)> = Vec::new();
        for (setup, d) in &deployed {
            let system = &setup.system;
            let (reps, warm) = match system {
                System::Ar if len > args.ar_max_len => continue,
                System::Ar => (args.ar_reps, 4),
                _ => (args.reps, 8),
            };
            let runs = clients
                .iter()
                .map(|&n| {
                    run_load(
                        d,
                        *system,
                        (&request(warm), &request(len)),
                        n,
                        reps.max(1),
                        &limits,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            results.push((*setup, runs));
        }
        // The latency table: one client's median request.
        let one = |runs: &[Load]| runs[0].median().seconds;
        let ar_s = results
            .iter()
            .find(|(s, _)| s.system == System::Ar)
            .map(|(_, r)| one(r));
        let mut row = json!({ "len": len });
        for (setup, runs) in &results {
            let system = setup.system;
            let (l, m) = (&runs[0], runs[0].median());
            // Mean bytes of one request (all of them the same request).
            let bytes = (l.bytes as f64 / l.samples.len() as f64).round() as u64;
            let per = bytes as f64 / m.traversals as f64;
            let speedup = ar_s.filter(|_| system != System::Ar).map(|a| a / m.seconds);
            println!(
                "| {len} | {} | {} | {:.3} | {} | {per:.0} | {} | {:.3} |",
                system.name(),
                setup.batch_cell(),
                m.seconds,
                speedup.map_or("-".into(), |x| format!("{x:.1}x")),
                m.traversals,
                m.compute_s
            );
            row[setup.key(several)] = json!({"seconds": m.seconds, "bytes": bytes, "traversals": m.traversals, "bytes_per_traversal": per, "compute_seconds": m.compute_s, "speedup_vs_ar": speedup, "max_batch": setup.max_batch});
        }
        // Kept for the older tables: BlockTrain's speedup over the AR pipeline (its first
        // batch setting's).
        row["speedup"] = json!(results
            .iter()
            .find(|(s, _)| s.system == System::Blocktrain)
            .zip(ar_s)
            .map(|((_, r), a)| a / one(r)));
        rows.push(row);
        loads.extend(results.into_iter().map(|(s, r)| (len, s, r)));
    }
    let load_json = load::report(&loads);
    let one_way = args.link.delay_ms as f64 / 1e3;
    println!(
        "\nOne traversal crosses 6 one-way delays ({:.0} ms); the AR pipeline pays that per byte.",
        6.0 * one_way * 1e3
    );
    let out = json!({
        "bench": "inference",
        "hosts": format!("{hosts:?}"),
        "setup": setup,
        "link": args.link.to_string(),
        "weights": sources.weights,
        "steps_per_block": args.steps_per_block,
        "shape": args.shape.to_string(),
        "tie": args.shape.tie,
        "host_layers": sources.host_layers,
        "total_layers": sources.host_layers.iter().sum::<i64>(),
        "logical_params": logical_params(args, &sources),
        "embed_dim": args.embed_dim,
        "systems": args.systems.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "reps": args.reps,
        "ar_reps": args.ar_reps,
        "clients": clients,
        "max_batch": batches,
        "batch_window_ms": args.batch_window_ms,
        "prompt": args.prompt,
        "rows": rows,
        "load": load_json,
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("wrote {}", args.json.display());
    Ok(())
}

/// The `--max-batch` values in the order given, each once, checked as `serve` checks them.
fn batch_settings(args: &BenchInferenceArgs) -> Result<Vec<usize>> {
    let mut batches: Vec<usize> = Vec::new();
    for &n in &args.max_batch {
        if !(1..=MAX_BATCH_LIMIT).contains(&n) {
            bail!("--max-batch values must be 1..={MAX_BATCH_LIMIT}");
        }
        if !batches.contains(&n) {
            batches.push(n);
        }
    }
    if batches.is_empty() {
        bail!("--max-batch needs a value");
    }
    if !(0.0..=1000.0).contains(&args.batch_window_ms) {
        bail!("--batch-window-ms must be 0..=1000");
    }
    Ok(batches)
}

/// Parameters of the AR reference the hosts' layer applications correspond to (untied), or
/// None for trained weights.
fn logical_params(args: &BenchInferenceArgs, sources: &sources::Sources) -> Option<i64> {
    args.checkpoint.is_none().then(|| {
        LogicalShape {
            n_layers: sources.host_layers.iter().sum(),
            tie: 1,
            ..args.shape.clone()
        }
        .params()
    })
}
