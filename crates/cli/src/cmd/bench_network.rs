//! `blocktrain bench network`: a real training run over HTTP, worker processes on
//! loopback or on emulated WAN hosts, measured from the first version to the last:
//! held-out CE at start and end (masked family: the ELBO, nats/byte; edm: the paper's
//! denoising CE, not a likelihood), bytes moved, wall time.
//!
//! Hosts: with `--hosts netns` each worker runs in its own network namespace
//! (`scripts/wan-hosts`: veth + tbf at the link's rate, both directions) and reaches the
//! coordinator through its own user-space link that adds the delay (the kernel here has
//! no netem). Where namespaces are not permitted it falls back to loopback with the
//! user-space link doing both delay and rate, and says so.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use blocktrain_model::data::Split;
use blocktrain_model::run::RunDir;
use blocktrain_wanlink::{measure_blocking, spawn_link_thread, LinkSpec, ThreadLink};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::args::DeviceArgs;
use crate::cmd::demo::{serve_until_done, threads_per_worker, worker_command, DemoArgs};
use crate::cmd::eval;
use crate::profile::Profile;

/// Where the worker processes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Hosts {
    /// Every worker on loopback (behind its own link when --link is given).
    Loopback,
    /// Every worker in its own network namespace bt-hK (needs root; falls back to loopback).
    Netns,
}

/// Flags of `blocktrain bench network`.
#[derive(Args, Debug)]
pub struct BenchNetworkArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 6)]
    pub workers: usize,
    /// Blocks (workers per block = workers / blocks, rounded up).
    #[arg(long, default_value_t = 3)]
    pub blocks: usize,
    /// Objective family: masked (CE is the held-out ELBO) or edm (CE is the paper's
    /// denoising cross-entropy on each block's interval).
    #[arg(long, value_enum, default_value = "masked")]
    pub objective: crate::cmd::demo::FamilyArg,
    /// Local steps per block over the whole run, summed over its workers (the
    /// single-worker `train --steps` equivalent at equal tokens).
    #[arg(long, default_value_t = 600)]
    pub steps_per_block: i64,
    /// Local steps per round (H).
    #[arg(long, default_value_t = 50)]
    pub local_steps: i64,
    /// Update codec.
    #[arg(long, default_value = "fp16")]
    pub codec: String,
    /// Codec of the checkpoint copies workers download: fp16, int8 or fp32.
    #[arg(long, default_value = "fp16")]
    pub checkpoint_codec: String,
    /// Outer optimizer: nesterov or average (default: the run.toml default).
    #[arg(long)]
    pub outer: Option<String>,
    /// Outer learning rate (nesterov).
    #[arg(long)]
    pub outer_lr: Option<f64>,
    /// Outer momentum (nesterov).
    #[arg(long)]
    pub outer_momentum: Option<f64>,
    /// Model and optimizer preset.
    #[arg(long, value_enum, default_value = "demo")]
    pub profile: Profile,
    /// Emulated link per worker, DELAY[,RATE] each way (e.g. 40ms,100mbit). None: plain loopback.
    #[arg(long)]
    pub link: Option<LinkSpec>,
    /// Where workers run.
    #[arg(long, value_enum, default_value = "loopback")]
    pub hosts: Hosts,
    /// Held-out windows for the start and end CE (0 = the whole split).
    #[arg(long, default_value_t = 2000)]
    pub eval_windows: usize,
    /// Held-out split for the CE.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Run directory (must not hold another run).
    #[arg(long, default_value = "runs/bench-network")]
    pub out: PathBuf,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-network.json")]
    pub json: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Participation: every worker misses this share of rounds (it stays away, training
    /// nothing, for as long as its last lease took), in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    pub miss: f64,
    /// Participation: the last third of the workers (the third of three hosts) run at
    /// 1/F of their speed (they sleep between steps); 1 = all at full speed.
    #[arg(long, default_value_t = 1.0)]
    pub slow_host: f64,
    /// A round closes this long after its first update without its quorum (seconds;
    /// default: the run.toml default).
    #[arg(long)]
    pub round_timeout: Option<f64>,
    /// Asynchronous updates: merge an update computed up to K versions back (default:
    /// the run.toml default; 0 = synchronous rounds).
    #[arg(long)]
    pub max_staleness: Option<u64>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub(crate) fn ce(
    model: &Path,
    split: Split,
    windows: usize,
    device: tch::Device,
) -> Result<(f64, f64)> {
    let run = RunDir::open(model)?;
    let r = eval::evaluate(&run, split, 1, windows, 64, 1234, device)?;
    // Masked family: the ELBO (its CE over t is the same number); edm: the paper's CE.
    Ok(match (run.manifest.family.is_edm(), r.ce) {
        (true, Some(c)) => (c.nats, c.se),
        _ => (r.nats, r.se),
    })
}

fn outer_name(cfg: &blocktrain_train::config::RunConfig) -> String {
    match cfg.outer.optimizer {
        blocktrain_train::config::OuterKind::Average => "average".to_string(),
        _ => format!(
            "nesterov lr {} momentum {}",
            cfg.outer.lr, cfg.outer.momentum
        ),
    }
}

/// Runs `blocktrain bench network`.
pub fn run(args: BenchNetworkArgs) -> Result<()> {
    crate::cmd::coordinator::init_logging_quiet();
    let device = args.device.setup()?;
    let split = match args.split.as_str() {
        "valid" => Split::Valid,
        "test" => Split::Test,
        other => bail!("--split is valid or test, not {other}"),
    };
    if args.out.join("state.sqlite").exists() {
        bail!(
            "{} already holds a run; pass a new --out",
            args.out.display()
        );
    }
    let demo = DemoArgs {
        profile: args.profile,
        objective: args.objective,
        blocks: args.blocks,
        workers: args.workers,
        local_steps: Some(args.local_steps),
        codec: args.codec.clone(),
        out: Some(args.out.clone()),
        data: "wikitext2".into(),
        prompt: String::new(),
        len: 0,
        seed: args.seed,
        device: args.device.clone(),
    };
    let mut cfg = demo.run_config()?;
    let per_block = cfg.training.workers_per_block as i64;
    cfg.training.rounds = (args.steps_per_block / (args.local_steps * per_block)).max(1) as u64;
    match args.outer.as_deref() {
        None => {}
        Some("nesterov") => cfg.outer.optimizer = blocktrain_train::config::OuterKind::Nesterov,
        Some("average") => cfg.outer.optimizer = blocktrain_train::config::OuterKind::Average,
        Some(o) => bail!("--outer is nesterov or average, not {o}"),
    }
    cfg.wire.checkpoint_codec = args.checkpoint_codec.clone();
    if let Some(t) = args.round_timeout {
        cfg.faults.round_timeout_secs = t;
    }
    if let Some(k) = args.max_staleness {
        cfg.training.max_staleness = k;
    }
    let slow_from = args.workers - args.workers / 3; // workers after this are slow
    cfg.outer.lr = args.outer_lr.unwrap_or(cfg.outer.lr);
    cfg.outer.momentum = args.outer_momentum.unwrap_or(cfg.outer.momentum);
    cfg.validate()?;

    // Hosts and links, checked before anything is trained.
    let mut hosts = args.hosts;
    if hosts == Hosts::Netns {
        let rate = args
            .link
            .and_then(|l| l.rate_bits_per_s)
            .map_or("1gbit".to_string(), |r| format!("{}kbit", r / 1000));
        let up = Command::new("scripts/wan-hosts")
            .args(["up", &args.workers.to_string(), &rate])
            .status();
        if !matches!(up, Ok(s) if s.success()) {
            println!("note: network namespaces are not available here; falling back to loopback with user-space links (delay and rate)");
            hosts = Hosts::Loopback;
        }
    }
    let link_desc = match (&args.link, hosts) {
        (None, _) => "none (loopback)".to_string(),
        (Some(l), Hosts::Netns) => format!("{l}: delay from a user-space link per host, rate from tbf on each host's veth (both directions)"),
        (Some(l), Hosts::Loopback) => format!("{l}: user-space link per worker on loopback (delay and rate)"),
    };
    let probe = match args.link {
        Some(l) => {
            let p = measure_blocking(l, blocktrain_wanlink::bulk_bytes_for(&l, 0.5))?;
            println!("link check (emulator on loopback): {p}");
            Some(p)
        }
        None => None,
    };
    if hosts == Hosts::Netns {
        let _ = Command::new("scripts/wan-hosts")
            .args(["check", &args.workers.to_string()])
            .status();
    }

    let rounds = cfg.training.rounds;
    println!(
        "== bench network: {} workers on {} blocks ({} per block), {} rounds x {} local steps, codec {}, outer {}; link {}",
        args.workers, args.blocks, per_block, rounds, args.local_steps, cfg.wire.codec, outer_name(&cfg), link_desc
    );
    if args.miss > 0.0 || args.slow_host > 1.0 {
        println!(
            "   participation: every worker misses {:.0}% of rounds; workers {}..={} at 1/{} speed; rounds close at quorum or {} s after their first update; max_staleness {}",
            100.0 * args.miss, slow_from + 1, args.workers, args.slow_host, cfg.faults.round_timeout_secs, cfg.training.max_staleness
        );
    }
    // Version 0 is written when the coordinator opens the state; evaluate it first.
    drop(blocktrain_train::coordinator::Coordinator::open(
        &args.out,
        Some(cfg.clone()),
        blocktrain_train::now_ms(),
    )?);
    let model = args.out.join("model");
    let start_ce = ce(&model, split, args.eval_windows, device)?;
    println!(
        "CE at version 0: {:.4} ± {:.4} nats/byte ({})",
        start_ce.0,
        start_ce.1,
        split.name()
    );

    let logs = args.out.join("workers");
    std::fs::create_dir_all(&logs)?;
    let mut links: Vec<ThreadLink> = Vec::new();
    let t0 = Instant::now();
    let status = serve_until_done(cfg.clone(), &args.out, |url| {
        let coord: SocketAddr = url.trim_start_matches("http://").parse()?;
        let threads = threads_per_worker(args.workers, &args.device);
        let mut children = Vec::new();
        for k in 1..=args.workers {
            let (prefix, worker_url) = match (args.link, hosts) {
                (None, Hosts::Loopback) => (vec![], url.to_string()),
                (link, Hosts::Netns) => {
                    let spec = LinkSpec {
                        delay_ms: link.map_or(0, |l| l.delay_ms),
                        rate_bits_per_s: None, // tbf shapes the rate
                    };
                    let l = spawn_link_thread(format!("10.77.{k}.1:0").parse()?, coord, spec)?;
                    let u = format!("http://{}", l.local_addr());
                    links.push(l);
                    (
                        vec![
                            "ip".into(),
                            "netns".into(),
                            "exec".into(),
                            format!("bt-h{k}"),
                        ],
                        u,
                    )
                }
                (Some(spec), Hosts::Loopback) => {
                    let l = spawn_link_thread("127.0.0.1:0".parse()?, coord, spec)?;
                    let u = format!("http://{}", l.local_addr());
                    links.push(l);
                    (vec![], u)
                }
            };
            let mut cmd = worker_command(&prefix, &worker_url, &logs, k, &args.device, threads)?;
            cmd.args(["--miss", &args.miss.to_string()]);
            // Worker slot k misses the same leases in every run with this seed, whatever
            // its fresh key, so sync and async runs compare paired.
            let slot_seed = args.seed.wrapping_mul(1_000_003).wrapping_add(k as u64);
            cmd.args(["--participation-seed", &slot_seed.to_string()]);
            if k > slow_from {
                cmd.args(["--slowdown", &args.slow_host.to_string()]);
            }
            children.push(cmd.spawn().context("starting a worker")?);
        }
        Ok(children)
    })?;
    let wall = t0.elapsed().as_secs_f64();
    let end_ce = ce(&model, split, args.eval_windows, device)?;
    // The other held-out split too, so one run both selects (valid) and reports (test).
    let other = match split {
        Split::Valid => Split::Test,
        _ => Split::Valid,
    };
    let other_ce = ce(&model, other, args.eval_windows, device)?;
    println!(
        "CE at the end: {:.4} ± {:.4} on {}, {:.4} ± {:.4} on {} (nats/byte)",
        end_ce.0,
        end_ce.1,
        split.name(),
        other_ce.0,
        other_ce.1,
        other.name()
    );
    let link_bytes: u64 = links.iter().map(|l| l.bytes_up() + l.bytes_down()).sum();
    drop(links);
    if hosts == Hosts::Netns {
        let _ = Command::new("scripts/wan-hosts")
            .args(["down", &args.workers.to_string()])
            .status();
    }
    let moved = status.bytes_up + status.bytes_down;
    let drop_ce = start_ce.0 - end_ce.0;
    println!("\n| workers | per block | rounds x H | codec | outer | link | hosts | CE start | CE end | MB up | MB down | GB moved | MB per 0.1 CE | wall s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} x {} | {} | {} | {} | {:?} | {:.3} | {:.4} ± {:.4} | {:.1} | {:.1} | {:.4} | {:.1} | {:.0} |",
        args.workers,
        per_block,
        rounds,
        args.local_steps,
        cfg.wire.codec,
        outer_name(&cfg),
        args.link.map_or("-".into(), |l| l.to_string()),
        hosts,
        start_ce.0,
        end_ce.0,
        end_ce.1,
        status.bytes_up as f64 / 1e6,
        status.bytes_down as f64 / 1e6,
        moved as f64 / 1e9,
        moved as f64 / 1e6 / (drop_ce / 0.1).max(1e-9),
        wall
    );
    let out = json!({
        "bench": "network",
        "workers": args.workers, "blocks": args.blocks, "workers_per_block": per_block,
        "rounds": rounds, "local_steps": args.local_steps, "steps_per_block": args.steps_per_block,
        "codec": cfg.wire.codec, "checkpoint_codec": cfg.wire.checkpoint_codec, "outer": format!("{:?}", cfg.outer.optimizer),
        "outer_lr": cfg.outer.lr, "outer_momentum": cfg.outer.momentum,
        "profile": format!("{:?}", args.profile), "model": cfg.model,
        "hosts": format!("{hosts:?}"), "link": args.link.map(|l| l.to_string()), "link_setup": link_desc,
        "link_probe": probe.map(|p| json!({"rtt_ms": p.rtt_ms, "mbit_per_s": p.mbit_per_s})),
        "split": split.name(), "eval_windows": args.eval_windows,
        "ce_start": start_ce.0, "ce_start_se": start_ce.1, "ce_end": end_ce.0, "ce_end_se": end_ce.1,
        "other_split": other.name(), "ce_end_other": other_ce.0, "ce_end_other_se": other_ce.1,
        "bytes_up": status.bytes_up, "bytes_down": status.bytes_down, "bytes_through_links": link_bytes,
        "updates": status.updates, "stale_applied": status.stale_applied, "wall_seconds": wall,
        "miss": args.miss, "slow_host": args.slow_host, "slow_workers": args.workers - slow_from,
        "round_timeout_secs": cfg.faults.round_timeout_secs,
        "seed": args.seed, "max_staleness": cfg.training.max_staleness, "staleness_exponent": cfg.training.staleness_exponent,
        "machine": format!("{} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&out)?)?;
    println!("wrote {}", args.json.display());
    Ok(())
}
