//! `blocktrain bench load`: many simulated lightweight workers against one coordinator
//! process: requests per second it holds, latency percentiles, and its peak memory.
//!
//! Each simulated worker has its own key and connection and does what a real worker does
//! on the wire, without training: registers, asks for work, renews its lease with
//! heartbeats, and polls `/v1/status` now and then (`bench_load_driver.rs`: async tasks,
//! so the generator's own cost stays small). Every request is signed and verified.
//! `--uploaders N` adds workers that upload signed updates of the block's real shape
//! (a fresh key each, since a spot check flags their made-up deltas), so screening and
//! spot-check recomputation (`--spot-checks`, `--screen-windows`) load the coordinator
//! while the others' latencies are measured. `--compare` runs the same load a second
//! time against a coordinator that fsyncs every commit (no group commit), side by side.
//! The coordinator runs as its own process, so its peak resident memory (VmHWM) is its
//! own.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::wire::{RegisterRequest, WorkReply, WorkerInfo};

use super::bench_load_driver::{self as driver, StopAt, Tally};
use blocktrain_train::client::Client;
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
    /// Extra workers that upload updates back to back (their latencies are reported
    /// apart: an upload waits for vetting).
    #[arg(long, default_value_t = 0)]
    pub uploaders: usize,
    /// Fraction of uploads the coordinator recomputes (the run's spot_check_fraction).
    #[arg(long, default_value_t = 0.0)]
    pub spot_checks: f64,
    /// Held-out windows each upload is screened on (0: screening off).
    #[arg(long, default_value_t = 0)]
    pub screen_windows: usize,
    /// Also run the load against a coordinator that fsyncs every commit, and report both.
    #[arg(long)]
    pub compare: bool,
    /// Also run the load against the coordinator of another `blocktrain` build (e.g. an
    /// older commit's), side by side; may be given more than once.
    #[arg(long)]
    pub baseline_exe: Vec<PathBuf>,
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

/// Runs the benchmark (twice with `--compare`), prints the table and writes the JSON.
pub fn run(args: BenchLoadArgs) -> Result<()> {
    if args.workers == 0 || args.seconds == 0 {
        bail!("--workers and --seconds must be positive");
    }
    if !(0.0..=1.0).contains(&args.spot_checks) {
        bail!("--spot-checks is a fraction in [0, 1]");
    }
    let exe = std::env::current_exe()?;
    let mut rows = vec![run_once(&args, &exe, "group commit", false)?];
    if args.compare {
        rows.push(run_once(&args, &exe, "fsync per commit", true)?);
    }
    for old in &args.baseline_exe {
        let label = format!("baseline {}", old.display());
        rows.push(run_once(&args, old, &label, false)?);
    }
    println!("\n| coordinator | workers | uploaders | spot checks | requests | req/s | p50 ms | p99 ms | max ms | errors | 429s | uploads | upload p50 ms | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {:.0} | {:.0} |",
            r["coordinator"].as_str().unwrap_or(""),
            r["workers"],
            r["uploaders"],
            r["spot_checks"],
            r["requests"],
            r["requests_per_s"].as_f64().unwrap_or(0.0),
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
            r["max_ms"].as_f64().unwrap_or(0.0),
            r["errors"],
            r["rate_limited"],
            r["uploads"],
            r["upload_p50_ms"].as_f64().unwrap_or(0.0),
            r["coordinator_peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64
        );
    }
    let out = json!({ "bench": "load", "runs": rows });
    std::fs::write(&args.json, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("wrote {}", args.json.display());
    Ok(())
}

/// One load run against a fresh coordinator process; its JSON row.
fn run_once(
    args: &BenchLoadArgs,
    exe: &std::path::Path,
    label: &str,
    sync_every_commit: bool,
) -> Result<serde_json::Value> {
    let dir = tempdir_for("bench-load")?;
    let toml = dir.join("run.toml");
    // With uploaders, every worker can hold a lease (the lease holders would otherwise
    // fill every slot and the uploaders only ever be told to wait).
    let per_block = match args.uploaders {
        0 => 4,
        n => (args.workers + n).div_ceil(args.blocks.max(1)) + 4,
    };
    // A tiny model: the coordinator's per-request work, not training, is measured.
    std::fs::write(
        &toml,
        format!(
            "blocks = {}\ndataset = \"shakespeare\"\n[model]\nd_model = 16\nn_layers = 1\nn_heads = 2\nmlp_ratio = 2\nwindow = 16\ncausal = false\nt_cond = false\n[training]\nrounds = 1000000\nworkers_per_block = {}\nlocal_steps = 4\nbatch = 4\n[trust]\nscreen_windows = {}\nspot_check_fraction = {}\n",
            args.blocks, per_block, args.screen_windows, args.spot_checks
        ),
    )?;
    let state = dir.join("state");
    let mut cmd = Command::new(exe);
    if sync_every_commit {
        cmd.env("BLOCKTRAIN_SYNC_EVERY_COMMIT", "1");
    }
    let child = cmd
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
        "== bench load ({label}): {} simulated workers + {} uploaders, {} s, {} ms between a worker's requests, coordinator at {url}",
        args.workers, args.uploaders, args.seconds, args.think_ms
    );

    let tally = Arc::new(Mutex::new(Tally::default()));
    let uploads = Arc::new(Mutex::new(Vec::<f64>::new()));
    let stop_at: StopAt = Arc::new(Mutex::new(None));
    let think = Duration::from_millis(args.think_ms);
    let driver = driver::start(&url, args.workers, think, tally.clone(), stop_at.clone())?;
    let mut threads = vec![driver];
    let began = Instant::now();
    *stop_at.lock().unwrap() = Some(began + Duration::from_secs(args.seconds));
    for _ in 0..args.uploaders {
        let (url, uploads, stop_at) = (url.clone(), uploads.clone(), stop_at.clone());
        threads.push(std::thread::spawn(move || {
            upload_loop(&url, &uploads, &stop_at)
        }));
    }
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
    let mut up = uploads.lock().unwrap().clone();
    up.sort_by(f64::total_cmp);
    let row = json!({
        "coordinator": label, "workers": args.workers, "uploaders": args.uploaders,
        "spot_checks": args.spot_checks, "screen_windows": args.screen_windows,
        "seconds": wall, "think_ms": args.think_ms,
        "blocks": args.blocks, "requests": n, "requests_per_s": rps,
        "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0), "errors": tl.errors,
        "rate_limited": tl.rate_limited,
        "leases": tl.leases, "waits": tl.waits, "uploads": up.len(),
        "upload_p50_ms": up.get(up.len() / 2).copied().unwrap_or(0.0),
        "coordinator_peak_rss_bytes": peak_bytes, "coordinator_rss_end_bytes": rss,
    });
    drop(coord);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(row)
}

/// Registers a fresh key, takes a lease, downloads its checkpoint and uploads a small
/// signed update of its shape; again with a new key until the load ends (a spot check
/// flags a made-up delta, and its key gets no more work). Records each upload's time.
fn upload_loop(url: &str, uploads: &Mutex<Vec<f64>>, stop_at: &StopAt) {
    let cache = std::env::temp_dir().join(format!(
        "blocktrain-bench-load-cache-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut k = 0u32;
    while !stop_at.lock().unwrap().is_some_and(|t| Instant::now() >= t) {
        k += 1;
        let id = Identity::generate();
        let Ok(mut c) = Client::new(url, id.clone()) else {
            return;
        };
        let info = WorkerInfo::new("cpu");
        let reg = RegisterRequest {
            info: info.clone(),
            join_proof: None,
        };
        if c.post_json::<_, serde_json::Value>("/v1/register", &reg)
            .is_err()
        {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let Ok(WorkReply::Lease(lease)) = c.post_json::<_, WorkReply>("/v1/work", &info) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let Ok(bytes) = c.checkpoint(&lease.weights_hash, &cache) else {
            continue;
        };
        let Ok(served) = blocktrain_train::worker::decode_checkpoint(&bytes) else {
            continue;
        };
        let (base, _) = blocktrain_train::moments::split(served);
        // A small, distinct, finite delta: passes the norm checks, is screened, and a
        // spot check's recomputation disagrees with it.
        let delta: blocktrain_protocol::codec::Arrays = base
            .iter()
            .map(|(name, a)| {
                let data = (0..a.data.len())
                    .map(|i| 1e-4 * (((i as u32).wrapping_mul(2_654_435_761) ^ k) % 7) as f32)
                    .collect();
                (
                    name.clone(),
                    blocktrain_protocol::codec::Array {
                        shape: a.shape.clone(),
                        data,
                    },
                )
            })
            .collect();
        // A run that carries optimizer state takes the moments' delta too (zero here).
        let delta = match lease.carry_moments {
            true => {
                let shapes = delta
                    .iter()
                    .map(|(n, a)| (n.clone(), a.shape.clone()))
                    .collect();
                blocktrain_train::moments::join(delta, blocktrain_train::moments::zeros(&shapes))
            }
            false => delta,
        };
        let body =
            blocktrain_protocol::codec::encode(&delta, blocktrain_protocol::codec::Codec::Fp16);
        let t = Instant::now();
        let _ = c.upload_claimed(&lease, &body, f64::NAN, 0);
        uploads
            .lock()
            .unwrap()
            .push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_dir_all(&cache);
}

fn tempdir_for(name: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("blocktrain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
