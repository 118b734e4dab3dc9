//! `blocktrain bench train`: training throughput and memory of one block vs the E2E
//! model, optionally beside plain PyTorch on the same shapes. Each configuration runs
//! in its own child process so its peak resident memory is its own.
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use blocktrain_model::data::{Dataset, Split, WindowSampler};
use blocktrain_model::flops;
use blocktrain_model::optim::OptimConfig;
use blocktrain_model::trainer::{Objective, Trainer};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::args::DeviceArgs;
use crate::profile::Profile;

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Step time, bytes/s, GFLOP/s and peak memory: one block vs E2E (vs PyTorch).
    Train(BenchTrainArgs),
    /// A training run over HTTP (loopback or emulated WAN hosts): CE start/end, bytes moved.
    Network(crate::cmd::bench_network::BenchNetworkArgs),
    /// Latency per output and bytes per traversal: one-traversal diffusion vs an AR
    /// pipeline over three hosts behind emulated WAN links.
    Inference(crate::cmd::bench_inference::BenchInferenceArgs),
    /// Fresh against carried AdamW moments per lease, in one process: held-out CE on
    /// valid and test, and the bytes carrying them would add.
    OptimizerState(crate::cmd::bench_optim::BenchOptimArgs),
    /// Many simulated workers against one coordinator process: requests/s, latency
    /// percentiles, peak memory.
    Load(crate::cmd::bench_load::BenchLoadArgs),
    /// Per-layer serving cost (denoise step, cached AR step) of large logical shapes,
    /// extrapolated to a target size over several hosts.
    Layers(crate::cmd::bench_layers::BenchLayersArgs),
    /// Detection of cheating workers (flipped, scaled, noise, other data, screen-tuned,
    /// empty updates) at the shipped trust defaults, over seeded in-process runs.
    Attacks(crate::cmd::bench_attacks::BenchAttacksArgs),
    /// One configuration, in a child process (used by `bench train`).
    #[command(hide = true)]
    TrainOne(TrainOneArgs),
}

/// Flags of `blocktrain bench train`.
#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// Timed steps per configuration.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Blocks B (E2E has B x the layers of one block).
    #[arg(long, default_value_t = 3)]
    pub blocks: i64,
    /// Shape preset of one block.
    #[arg(long, value_enum, default_value = "demo")]
    pub profile: Profile,
    /// Also time plain PyTorch on the same shapes (needs `scripts/setup --with-pytorch`).
    #[arg(long)]
    pub pytorch: bool,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-train.json")]
    pub json: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Flags of the hidden child command.
#[derive(Args, Debug)]
pub struct TrainOneArgs {
    #[arg(long)]
    layers: i64,
    #[arg(long)]
    blocks: i64,
    #[arg(long)]
    steps: usize,
    #[arg(long)]
    warmup: usize,
    #[arg(long, value_enum)]
    profile: Profile,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Runs a bench subcommand.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train(a) => bench_train(a),
        BenchCommand::Network(a) => crate::cmd::bench_network::run(a),
        BenchCommand::Inference(a) => crate::cmd::bench_inference::run(a),
        BenchCommand::OptimizerState(a) => crate::cmd::bench_optim::run(a),
        BenchCommand::Load(a) => crate::cmd::bench_load::run(a),
        BenchCommand::Layers(a) => crate::cmd::bench_layers::run(a),
        BenchCommand::Attacks(a) => crate::cmd::bench_attacks::run(a),
        BenchCommand::TrainOne(a) => train_one(a),
    }
}

fn bench_train(args: BenchTrainArgs) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let device = args.device.setup()?;
    let block_layers = args.profile.preset().block.n_layers;
    let peak = matmul_peak_gflops(device);
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for (name, layers) in [
        ("one block", block_layers),
        ("E2E", block_layers * args.blocks),
    ] {
        eprintln!("bench: {name} ({layers} layers) ...");
        let mut cmd = Command::new(&exe);
        cmd.args([
            "bench",
            "train-one",
            "--layers",
            &layers.to_string(),
            "--blocks",
            &args.blocks.to_string(),
        ]);
        cmd.args([
            "--steps",
            &args.steps.to_string(),
            "--warmup",
            &args.warmup.to_string(),
        ]);
        cmd.args([
            "--profile",
            &format!("{:?}", args.profile).to_lowercase(),
            "--device",
            &args.device.device,
        ]);
        if let Some(t) = args.device.threads {
            cmd.args(["--threads", &t.to_string()]);
        }
        let mut row = child_json(cmd).with_context(|| format!("benchmarking {name}"))?;
        row["name"] = json!(name);
        if args.pytorch {
            row["pytorch"] = pytorch_row(&args, layers)?;
        }
        rows.push(row);
    }
    print_table(&rows, peak);
    let doc = json!({
        "bench": "train", "device": format!("{device:?}"), "threads": tch::get_num_threads(),
        "cpu_matmul_peak_gflops": peak, "profile": format!("{:?}", args.profile), "rows": rows,
    });
    std::fs::write(&args.json, serde_json::to_vec_pretty(&doc)?)?;
    eprintln!("wrote {}", args.json.display());
    Ok(())
}

fn child_json(mut cmd: Command) -> Result<Value> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("unexpected output: {text}"))
}

fn pytorch_row(args: &BenchTrainArgs, layers: i64) -> Result<Value> {
    let python = PathBuf::from(".venv/bin/python");
    let script = PathBuf::from("scripts/bench_pytorch.py");
    if !python.exists() || !script.exists() {
        bail!("--pytorch needs {} and {} (run from the repository root after `scripts/setup --with-pytorch`)", python.display(), script.display());
    }
    let b = args.profile.preset().block;
    let threads = args
        .device
        .threads
        .unwrap_or_else(|| tch::get_num_threads() as usize);
    let mut cmd = Command::new(python);
    cmd.arg(script);
    for (k, v) in [
        ("--d-model", b.d_model),
        ("--layers", layers),
        ("--heads", b.n_heads),
        ("--window", b.window),
        ("--batch", args.profile.preset().batch),
        ("--steps", args.steps as i64),
        ("--warmup", args.warmup as i64),
        ("--threads", threads as i64),
    ] {
        cmd.args([k, &v.to_string()]);
    }
    let (lo, hi) = interval(layers == b.n_layers, args.blocks);
    cmd.args(["--lo", &lo.to_string(), "--hi", &hi.to_string()]);
    child_json(cmd).context("PyTorch reference (scripts/bench_pytorch.py)")
}

/// The interval a configuration trains on: the middle block, or all of [0, 1] for E2E.
fn interval(one_block: bool, blocks: i64) -> (f64, f64) {
    if one_block && blocks > 1 {
        let b = blocks / 2;
        (b as f64 / blocks as f64, (b + 1) as f64 / blocks as f64)
    } else {
        (0.0, 1.0)
    }
}

fn train_one(args: TrainOneArgs) -> Result<()> {
    let device = args.device.setup()?;
    let _ = Tensor::ones([8, 8], (Kind::Float, device))
        .matmul(&Tensor::ones([8, 8], (Kind::Float, device)));
    let baseline = vm_hwm_mb();
    let preset = args.profile.preset();
    let mut cfg = preset.block.clone();
    let one_block = args.layers == cfg.n_layers;
    cfg.n_layers = args.layers;
    let (lo, hi) = interval(one_block, args.blocks);
    let optim = OptimConfig::default();
    let mut trainer = Trainer::new(&cfg, Objective::Interval { lo, hi }, optim, device, 0)?;
    let data = Dataset::WikiText2.load(Split::Train)?;
    let mut sampler = WindowSampler::new(&data, cfg.window, 0, device)?;
    let total = (args.warmup + args.steps) as i64;
    let mut times = Vec::new();
    let mut loss = 0.0;
    for i in 0..total {
        let x = sampler.next_batch(preset.batch);
        let start = Instant::now();
        let l = trainer.train_step(&x, total);
        if device.is_cuda() {
            cuda_sync(device);
        }
        if i >= args.warmup as i64 {
            times.push(start.elapsed().as_secs_f64());
        }
        if i + 1 == total {
            loss = l.double_value(&[]);
        }
    }
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let tokens = (preset.batch * cfg.window) as f64;
    let params = trainer.param_count();
    let row = json!({
        "impl": "blocktrain (tch)", "layers": cfg.n_layers, "d_model": cfg.d_model, "params": params,
        "lo": lo, "hi": hi, "batch": preset.batch, "window": cfg.window,
        "step_ms_mean": mean * 1e3, "step_ms_median": times[times.len() / 2] * 1e3, "step_ms_min": times[0] * 1e3,
        "bytes_per_s": tokens / times[times.len() / 2],
        "gflops": flops::train_flops_per_token(&cfg) * tokens / times[times.len() / 2] / 1e9,
        "peak_rss_mb": vm_hwm_mb(), "baseline_rss_mb": baseline, "final_loss": loss,
    });
    println!("{row}");
    Ok(())
}

/// Peak resident set size of this process (VmHWM), MiB.
fn vm_hwm_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// What a large fp32 matrix multiply achieves on this device: the practical peak.
fn matmul_peak_gflops(device: Device) -> f64 {
    let n = 1024;
    let a = Tensor::randn([n, n], (Kind::Float, device));
    let b = Tensor::randn([n, n], (Kind::Float, device));
    let _ = a.matmul(&b);
    let reps = 10;
    let start = Instant::now();
    for _ in 0..reps {
        let _ = a.matmul(&b);
    }
    if device.is_cuda() {
        cuda_sync(device);
    }
    2.0 * (n * n * n) as f64 * reps as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn print_table(rows: &[Value], peak: f64) {
    println!(
        "training one block vs E2E (WikiText-2 windows; fp32 matmul peak here: {peak:.1} GFLOP/s)"
    );
    println!(
        "{:<10} {:>6} {:>9} {:>11} {:>12} {:>8} {:>7} {:>13} {:>12}",
        "model",
        "layers",
        "params",
        "step ms",
        "bytes/s",
        "GFLOP/s",
        "% peak",
        "peak RSS MiB",
        "vs PyTorch"
    );
    for r in rows {
        let ratio = r["pytorch"]["step_ms_median"]
            .as_f64()
            .map(|p| {
                format!(
                    "{:.2}x",
                    r["step_ms_median"].as_f64().unwrap_or(f64::NAN) / p
                )
            })
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<10} {:>6} {:>9} {:>11.1} {:>12.0} {:>8.1} {:>6.1}% {:>6.0} (+{:>4.0}) {:>12}",
            r["name"].as_str().unwrap_or("?"),
            r["layers"],
            r["params"],
            r["step_ms_median"].as_f64().unwrap_or(f64::NAN),
            r["bytes_per_s"].as_f64().unwrap_or(f64::NAN),
            r["gflops"].as_f64().unwrap_or(f64::NAN),
            100.0 * r["gflops"].as_f64().unwrap_or(f64::NAN) / peak,
            r["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
            r["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)
                - r["baseline_rss_mb"].as_f64().unwrap_or(f64::NAN),
            ratio
        );
    }
    println!("step ms: median; peak RSS: host memory of the whole process (+ above the libtorch baseline; GPU memory not included); vs PyTorch: our median step time / PyTorch's");
}

/// Waits for queued CUDA work so timings cover it.
fn cuda_sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}
