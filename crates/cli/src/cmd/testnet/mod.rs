//! `blocktrain testnet`: a local network (a coordinator, worker processes, block server
//! processes on loopback) that trains and serves while faults are injected on a seeded
//! schedule, then checks the invariants users rely on and reports what happened.
//!
//! Faults: `kill` (SIGKILL a worker or block server, restart workers), `pause`
//! (SIGSTOP for a while, then SIGCONT), `corrupt` (hostile uploads: garbage bodies
//! with forged signatures), `delay` (workers reach the coordinator through an emulated
//! 30 ms link), `loss` (that link drops a seeded fifth of connections mid-stream: this
//! kernel has no netem, and a TCP proxy cannot drop packets, so loss is what an
//! application sees of a bad link: connections that die).
//!
//! Invariants checked: every block's version history rises by one from 0 and every
//! committed checkpoint loads; every accepted update was merged into exactly one
//! version (none lost); every rejection has a reason; the receipts ledger verifies;
//! every inference request completes or fails with an error naming the blocks that
//! failed; the process's peak memory stays under `--max-rss-mb`.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blocktrain_model::config::ModelConfig;
use blocktrain_protocol::frame::Sampling;
use blocktrain_serve::client::{self as infer, Request};
use blocktrain_serve::hop::HopLimits;
use blocktrain_train::config::RunConfig;
use blocktrain_train::coordinator::Coordinator;
use blocktrain_train::{now_ms, server};
use blocktrain_wanlink::{spawn_link_thread_with_cuts, Cuts, LinkSpec};
use clap::{Args, ValueEnum};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::args::DeviceArgs;
use crate::cmd::demo::worker_command;

mod checks;
use checks::check_training;

/// A fault the testnet can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Fault {
    /// SIGKILL a worker (restarted) or a block server.
    Kill,
    /// SIGSTOP a process for a while, then SIGCONT.
    Pause,
    /// Emulated 30 ms link between workers and the coordinator.
    Delay,
    /// Connections dropped mid-stream on the workers' link (no netem here for packet loss).
    Loss,
    /// Hostile uploads: garbage bodies with forged signatures.
    Corrupt,
}

/// Flags of `blocktrain testnet`.
#[derive(Args, Debug)]
pub struct TestnetArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    /// Block server processes per inference stage (replicas).
    #[arg(long, default_value_t = 2)]
    pub servers: usize,
    /// Faults to inject, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kill,pause,corrupt,delay,loss"
    )]
    pub faults: Vec<Fault>,
    /// Seeds the fault schedule (and the run).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Versions each of the 2 blocks goes through.
    #[arg(long, default_value_t = 4)]
    pub rounds: u64,
    /// Inference requests sent while faults hit the servers.
    #[arg(long, default_value_t = 8)]
    pub requests: usize,
    /// Fail if this process's peak resident memory exceeds this, MiB.
    #[arg(long, default_value_t = 4096)]
    pub max_rss_mb: u64,
    /// Working directory (replaced).
    #[arg(long, default_value = "runs/testnet")]
    pub out: PathBuf,
    /// Where to write the JSON report.
    #[arg(long, default_value = "testnet.json")]
    pub json: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = signal(self.0.id(), "-CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?
        .success();
    if !ok {
        bail!("kill {sig} {pid} failed");
    }
    Ok(())
}

fn peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Runs the testnet; exit status 1 if an invariant fails.
pub fn run(args: TestnetArgs) -> Result<()> {
    if args.workers == 0 || args.servers == 0 {
        bail!("--workers and --servers must be at least 1");
    }
    let _ = std::fs::remove_dir_all(&args.out);
    std::fs::create_dir_all(&args.out)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut events: Vec<String> = Vec::new();
    let log = |events: &mut Vec<String>, e: String| {
        println!("  fault: {e}");
        events.push(e);
    };

    // ---- training under faults ----
    let mut cfg = RunConfig {
        blocks: 2,
        dataset: "shakespeare".into(),
        seed: args.seed,
        model: ModelConfig {
            d_model: 32,
            n_layers: 1,
            n_heads: 2,
            mlp_ratio: 2,
            window: 32,
            causal: false,
            t_cond: false,
            edm: None,
        },
        ..Default::default()
    };
    cfg.training.rounds = args.rounds;
    cfg.training.local_steps = 60;
    cfg.training.batch = 8;
    cfg.training.workers_per_block = 2;
    cfg.faults.lease_secs = 3.0;
    cfg.faults.round_timeout_secs = 4.0;
    cfg.trust.spot_check_fraction = 0.2;
    let state = args.out.join("state");
    let coord = Coordinator::open(&state, Some(cfg.clone()), now_ms())?;
    let running = server::spawn("127.0.0.1:0".parse()?, coord)?;
    let mut url = running.url();
    let (delay, loss) = (
        args.faults.contains(&Fault::Delay),
        args.faults.contains(&Fault::Loss),
    );
    let link = if delay || loss {
        let spec = LinkSpec::parse(if delay { "30ms" } else { "0ms" })?;
        // Loss as a TCP proxy can emulate it: a fifth of connections dropped mid-stream.
        let cuts = loss.then_some(Cuts {
            fraction: 0.2,
            within: Duration::from_secs(2),
            seed: args.seed,
        });
        let l = spawn_link_thread_with_cuts("127.0.0.1:0".parse()?, running.addr, spec, cuts)?;
        url = format!("http://{}", l.local_addr());
        if delay {
            log(
                &mut events,
                format!("delay: workers reach the coordinator over a 30 ms link ({url})"),
            );
        }
        if loss {
            log(
                &mut events,
                "loss: the workers' link drops 20% of connections mid-stream (seeded)".into(),
            );
        }
        Some(l)
    } else {
        None
    };
    println!(
        "== testnet: {} workers, 2 blocks x {} rounds, faults {:?}, seed {}",
        args.workers, args.rounds, args.faults, args.seed
    );
    let logs = args.out.join("workers");
    std::fs::create_dir_all(&logs)?;
    let spawn_worker = |k: usize| -> Result<Proc> {
        let old = logs.join(format!("worker-{k}.log"));
        if old.exists() {
            let _ = std::fs::rename(&old, logs.join(format!("worker-{k}.{}.log", now_ms())));
        }
        Ok(Proc(
            worker_command(&[], &url, &logs, k, &args.device, 1)?.spawn()?,
        ))
    };
    let mut workers: Vec<Proc> = (1..=args.workers)
        .map(spawn_worker)
        .collect::<Result<_>>()?;
    let train_faults: Vec<Fault> = args
        .faults
        .iter()
        .copied()
        .filter(|f| matches!(f, Fault::Kill | Fault::Pause | Fault::Corrupt))
        .collect();
    let started = Instant::now();
    let mut next_fault = Instant::now() + Duration::from_millis(300);
    loop {
        let s = running.status()?;
        if s.done {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            // The invariant: every block reaches its last version. Say which did not.
            let behind: Vec<String> = s
                .blocks
                .iter()
                .filter(|b| b.version < b.rounds)
                .map(|b| {
                    format!(
                        "block {} at version {}/{}{}",
                        b.block + 1,
                        b.version,
                        b.rounds,
                        if b.stalled { " (stalled)" } else { "" }
                    )
                })
                .collect();
            bail!(
                "training did not finish within 300 s under faults: {}; logs in {}",
                behind.join(", "),
                logs.display()
            );
        }
        if !train_faults.is_empty() && Instant::now() >= next_fault {
            next_fault = Instant::now() + Duration::from_millis(rng.random_range(300..1000));
            let k = rng.random_range(0..workers.len());
            match train_faults[rng.random_range(0..train_faults.len())] {
                Fault::Kill => {
                    workers[k] = spawn_worker_after_kill(&mut workers[k], k + 1, &spawn_worker)?;
                    log(
                        &mut events,
                        format!("kill: worker {} killed and restarted", k + 1),
                    );
                }
                Fault::Pause => {
                    let pid = workers[k].0.id();
                    signal(pid, "-STOP")?;
                    std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
                    signal(pid, "-CONT")?;
                    log(
                        &mut events,
                        format!("pause: worker {} stopped, then resumed", k + 1),
                    );
                }
                Fault::Corrupt => {
                    let code =
                        corrupt_upload(&running.url(), rng.random_range(1..20), rng.random());
                    log(
                        &mut events,
                        format!("corrupt: forged garbage upload answered {code}"),
                    );
                }
                _ => {}
            }
        }
        // A worker that exited (a refused lease, say) is restarted: the run must finish.
        for (i, w) in workers.iter_mut().enumerate() {
            if w.0.try_wait()?.is_some() {
                *w = spawn_worker(i + 1)?;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let train_secs = started.elapsed().as_secs_f64();
    if let Some(l) = &link {
        if loss {
            log(
                &mut events,
                format!(
                    "loss: {} of {} worker connections were cut",
                    l.cut_connections(),
                    l.connections()
                ),
            );
        }
    }
    drop(workers);
    let mut failures: Vec<String> = Vec::new();
    check_training(&state, &args, &mut failures)?;
    let status = running.status()?;

    // ---- inference under faults ----
    let model = state.join("model");
    let mut servers: Vec<(u32, Proc, String)> = Vec::new();
    for block in 1..=2u32 {
        for _ in 0..args.servers {
            let (p, addr) = start_server(&model, block)?;
            servers.push((block, p, addr));
        }
    }
    let limits = HopLimits {
        stall_timeout: Duration::from_secs(2),
        ..HopLimits::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let route: Vec<String> = servers.iter().map(|s| s.2.clone()).collect();
    let plan = rt.block_on(infer::discover(&route, &limits))?;
    let infer_faults: Vec<Fault> = args
        .faults
        .iter()
        .copied()
        .filter(|f| matches!(f, Fault::Kill | Fault::Pause))
        .collect();
    let (mut completed, mut failed_named, mut failed_unnamed) = (0, 0, 0);
    let mut paused: Option<u32> = None;
    for i in 0..args.requests {
        if !infer_faults.is_empty() && rng.random_bool(0.5) {
            let j = rng.random_range(0..servers.len());
            let pid = servers[j].1 .0.id();
            match infer_faults[rng.random_range(0..infer_faults.len())] {
                Fault::Kill if servers[j].1 .0.try_wait()?.is_none() => {
                    signal(pid, "-KILL")?;
                    log(
                        &mut events,
                        format!(
                            "kill: block server {} (block {}) killed",
                            servers[j].2, servers[j].0
                        ),
                    );
                }
                Fault::Pause if paused.is_none() && servers[j].1 .0.try_wait()?.is_none() => {
                    signal(pid, "-STOP")?;
                    paused = Some(pid);
                    log(
                        &mut events,
                        format!(
                            "pause: block server {} (block {}) stopped",
                            servers[j].2, servers[j].0
                        ),
                    );
                }
                _ => {}
            }
        }
        let req = Request {
            prompt: b"ROMEO: ".to_vec(),
            len: 24,
            sampling: Sampling {
                steps_per_block: 4,
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                heun: false,
            },
            seed: i as u64,
        };
        match rt.block_on(infer::generate(&plan, &req, &limits)) {
            Ok(_) => completed += 1,
            Err(e) if e.to_string().contains("blocks") => {
                failed_named += 1;
                println!("  request {i}: failed, naming the hop: {e}");
            }
            Err(e) => {
                failed_unnamed += 1;
                failures.push(format!("request {i} failed without naming a hop: {e}"));
            }
        }
        if let (Some(pid), true) = (paused, rng.random_bool(0.5)) {
            signal(pid, "-CONT")?;
            paused = None;
            log(&mut events, "pause: block server resumed".into());
        }
    }
    drop(servers);
    let rss = peak_rss_mb();
    if rss > args.max_rss_mb {
        failures.push(format!(
            "peak memory {rss} MiB exceeds --max-rss-mb {}",
            args.max_rss_mb
        ));
    }
    running.stop()?;

    println!("\n| phase | result |\n|---|---|");
    println!(
        "| training | 2 blocks x {} versions in {train_secs:.1} s; updates {:?} |",
        args.rounds, status.updates
    );
    println!(
        "| inference | {completed} completed, {failed_named} failed naming the failing blocks, {failed_unnamed} failed unnamed (of {}) |",
        args.requests
    );
    println!("| faults | {} injected |", events.len());
    println!("| peak memory | {rss} MiB (this process: coordinator and clients) |");
    let report = json!({
        "seed": args.seed, "faults": format!("{:?}", args.faults), "events": events,
        "train_seconds": train_secs, "updates": status.updates,
        "inference": {"completed": completed, "failed_named": failed_named, "failed_unnamed": failed_unnamed},
        "peak_rss_mb": rss, "failures": failures,
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    if failures.is_empty() {
        println!("all invariants hold");
        Ok(())
    } else {
        for f in &failures {
            println!("INVARIANT BROKEN: {f}");
        }
        std::process::exit(1);
    }
}

fn spawn_worker_after_kill(
    w: &mut Proc,
    k: usize,
    spawn: &dyn Fn(usize) -> Result<Proc>,
) -> Result<Proc> {
    let _ = w.0.kill();
    let _ = w.0.wait();
    std::thread::sleep(Duration::from_millis(300));
    spawn(k)
}

/// A garbage upload with forged auth headers; returns the HTTP status (or the error).
fn corrupt_upload(url: &str, lease: i64, junk: u64) -> String {
    let body: Vec<u8> = (0..4096u64)
        .map(|i| (i.wrapping_mul(junk | 1) >> 3) as u8)
        .collect();
    let r = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/updates/{lease}"))
        .header("x-bt-key", "00".repeat(32))
        .header("x-bt-time", now_ms().to_string())
        .header("x-bt-nonce", format!("{junk:016x}"))
        .header("x-bt-sig", "11".repeat(64))
        .body(body)
        .send();
    match r {
        Ok(r) => r.status().to_string(),
        Err(e) => format!("error {e}"),
    }
}

fn start_server(model: &Path, block: u32) -> Result<(Proc, String)> {
    let args: Vec<String> = [
        "--blocks",
        &block.to_string(),
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
    ]
    .into_iter()
    .chain([
        "--keepalive-ms",
        "200",
        "--stall-timeout",
        "2",
        "--checkpoint",
    ])
    .map(str::to_string)
    .chain([model.display().to_string()])
    .collect();
    let (child, addr) = crate::cmd::serve::spawn_process(None, &args, Stdio::null())?;
    Ok((Proc(child), addr))
}
