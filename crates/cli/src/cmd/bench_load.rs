//! `blocktrain bench load`: many simulated lightweight workers against one coordinator
//! process: requests per second it holds, latency percentiles, and its peak memory.
//!
//! Each simulated worker has its own key and does what a real worker does on the wire,
//! without training: registers, asks for work, renews its lease with heartbeats, and
//! polls `/v1/status` now and then. Every request is signed and verified as usual.
//! The coordinator runs as its own process, so its peak resident memory (VmHWM) is its
//! own.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blocktrain_node::client::Client;
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::wire::{RegisterRequest, WorkReply, WorkerInfo};
use clap::Args;
use serde_json::json;

/// Flags of `blocktrain bench load`.
#[derive(Args, Debug)]
pub struct BenchLoadArgs {
    /// Simulated workers.
    #[arg(long, default_value_t = 200)]
    pub workers: usize,
    /// Seconds of load after every worker registered.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Pause between one worker's requests, milliseconds (0: back to back).
    #[arg(long, default_value_t = 100)]
    pub think_ms: u64,
    /// Blocks of the (tiny) run the coordinator serves.
    #[arg(long, default_value_t = 8)]
    pub blocks: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-load.json")]
    pub json: PathBuf,
}

struct CoordinatorProc(Child);

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `VmHWM` and `VmRSS` of a process, bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[derive(Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    errors: u64,
    leases: u64,
    waits: u64,
}

/// Runs the benchmark.
pub fn run(args: BenchLoadArgs) -> Result<()> {
    if args.workers == 0 || args.seconds == 0 {
        bail!("--workers and --seconds must be positive");
    }
    let dir = tempdir_for("bench-load")?;
    let toml = dir.join("run.toml");
    // A tiny model: the coordinator's per-request work, not training, is measured.
    std::fs::write(
        &toml,
        format!(
            "blocks = {}\ndataset = \"shakespeare\"\n[model]\nd_model = 16\nn_layers = 1\nn_heads = 2\nmlp_ratio = 2\nwindow = 16\ncausal = false\nt_cond = false\n[training]\nrounds = 1000\nworkers_per_block = 4\n[trust]\nscreen_windows = 0\nspot_check_fraction = 0.0\n",
            args.blocks
        ),
    )?;
    let state = dir.join("state");
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args(["coordinator", "--listen", "127.0.0.1:0", "--run"])
        .arg(&toml)
        .arg("--state")
        .arg(&state)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the coordinator")?;
    let coord = CoordinatorProc(child);
    let addr_file = state.join("coordinator.addr");
    let t0 = Instant::now();
    while !addr_file.exists() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the coordinator did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let addr = std::fs::read_to_string(&addr_file)?.trim().to_string();
    let url = if addr.starts_with("http") {
        addr
    } else {
        format!("http://{addr}")
    };
    println!(
        "== bench load: {} simulated workers, {} s, {} ms between a worker's requests, coordinator at {url}",
        args.workers, args.seconds, args.think_ms
    );

    let tally = Arc::new(Mutex::new(Tally::default()));
    let start_gate = Arc::new(std::sync::Barrier::new(args.workers + 1));
    let stop_at = Arc::new(Mutex::new(None::<Instant>));
    let mut threads = Vec::new();
    for _ in 0..args.workers {
        let (url, tally, gate, stop_at) = (
            url.clone(),
            tally.clone(),
            start_gate.clone(),
            stop_at.clone(),
        );
        let think = Duration::from_millis(args.think_ms);
        threads.push(std::thread::spawn(move || {
            let mut client = Client::new(&url, Identity::generate()).ok();
            let info = WorkerInfo::new("cpu");
            let registered = client.as_mut().is_some_and(|c| {
                c.post_json::<_, serde_json::Value>(
                    "/v1/register",
                    &RegisterRequest {
                        info: info.clone(),
                        join_proof: None,
                    },
                )
                .is_ok()
            });
            gate.wait();
            let (Some(mut c), true) = (client, registered) else {
                tally.lock().unwrap().errors += 1;
                return;
            };
            let mut lease = None;
            let mut i = 0u64;
            loop {
                if stop_at.lock().unwrap().is_some_and(|t| Instant::now() >= t) {
                    return;
                }
                i += 1;
                let t = Instant::now();
                let (ok, kind) = match (&lease, i % 10) {
                    (_, 0) => (c.get_json::<serde_json::Value>("/v1/status").is_ok(), 0),
                    (Some(id), _) => (
                        c.post_empty::<serde_json::Value>(&format!("/v1/leases/{id}/heartbeat"))
                            .is_ok(),
                        0,
                    ),
                    (None, _) => match c.post_json::<_, WorkReply>("/v1/work", &info) {
                        Ok(WorkReply::Lease(l)) => {
                            lease = Some(l.id);
                            (true, 1)
                        }
                        Ok(_) => (true, 2),
                        Err(_) => (false, 0),
                    },
                };
                let ms = t.elapsed().as_secs_f64() * 1e3;
                {
                    let mut tl = tally.lock().unwrap();
                    if ok {
                        tl.latencies_ms.push(ms);
                    } else {
                        tl.errors += 1;
                    }
                    tl.leases += u64::from(kind == 1);
                    tl.waits += u64::from(kind == 2);
                }
                std::thread::sleep(think);
            }
        }));
    }
    start_gate.wait();
    let began = Instant::now();
    *stop_at.lock().unwrap() = Some(began + Duration::from_secs(args.seconds));
    let mut peak = (0, 0);
    while began.elapsed() < Duration::from_secs(args.seconds) {
        std::thread::sleep(Duration::from_millis(500));
        let m = memory_of(coord.0.id());
        peak = (peak.0.max(m.0), m.1);
        let n = tally.lock().unwrap().latencies_ms.len();
        eprint!("\r{:>4.0} s, {n} requests", began.elapsed().as_secs_f64());
    }
    eprintln!();
    for t in threads {
        let _ = t.join();
    }
    let wall = began.elapsed().as_secs_f64();
    let (hwm, rss) = memory_of(coord.0.id());
    let peak_bytes = peak.0.max(hwm);
    let mut tl = tally.lock().unwrap();
    tl.latencies_ms.sort_by(f64::total_cmp);
    let n = tl.latencies_ms.len();
    if n == 0 {
        bail!("no request succeeded ({} errors)", tl.errors);
    }
    let pct = |p: f64| tl.latencies_ms[((n as f64 - 1.0) * p).round() as usize];
    let rps = n as f64 / wall;
    println!("\n| workers | requests | req/s | p50 ms | p99 ms | max ms | errors | leases | waits | coordinator peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {n} | {rps:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {:.0} |",
        args.workers,
        pct(0.5),
        pct(0.99),
        pct(1.0),
        tl.errors,
        tl.leases,
        tl.waits,
        peak_bytes as f64 / (1 << 20) as f64
    );
    let out = json!({
        "bench": "load", "workers": args.workers, "seconds": wall, "think_ms": args.think_ms,
        "blocks": args.blocks, "requests": n, "requests_per_s": rps,
        "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0), "errors": tl.errors,
        "leases": tl.leases, "waits": tl.waits,
        "coordinator_peak_rss_bytes": peak_bytes, "coordinator_rss_end_bytes": rss,
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("wrote {}", args.json.display());
    drop(coord);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempdir_for(name: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("blocktrain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
