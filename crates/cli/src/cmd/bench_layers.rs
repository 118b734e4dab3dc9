//! `blocktrain bench layers`: per-layer serving cost of logical shapes on this machine,
//! extrapolated to a large target (default: 75.8e9 parameters at d 8192 over 3 hosts).
//!
//! Per width d (heads d/128, MLP 4x, random weights), after one warm-up, median of reps:
//! - denoise: one bidirectional layer over T tokens (one diffusion step),
//!   FLOPs `2 P T + 4 T^2 d` (P: parameters of one layer);
//! - AR step: one causal layer, 1 new token after T cached ones, FLOPs `2 P + 4 T d`.
//!
//! Extrapolation (compute only, links excluded): the target has `L = layers_for(target)`
//! layers at the target d, `ceil(L / hosts)` per host. A layer's time at the target d is
//! its FLOPs over the GFLOP/s measured at the largest measured d. For T output bytes:
//! - diffusion = hosts * (L / hosts) * steps_per_block * t_denoise (one block per host,
//!   blocks in sequence, every step over all T positions);
//! - AR = T * L * t_ar (one byte per pass through every layer; t_ar at T of context, an
//!   upper bound for shorter contexts).
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use blocktrain_model::logical::{LogicalShape, Precision};
use blocktrain_model::transformer::KvCache;
use clap::Args;
use serde_json::{json, Value};
use tch::{Device, Tensor};

use crate::args::DeviceArgs;

/// Flags of `blocktrain bench layers`.
#[derive(Args, Debug)]
pub struct BenchLayersArgs {
    /// Widths d to measure (heads = d/128, at least 1; MLP 4x).
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048,4096")]
    pub shapes: Vec<i64>,
    /// Precision: f32, f16 or bf16 (on CPU, f16 matmuls are slow; bf16 is the fast one).
    #[arg(long, default_value = "bf16")]
    pub dtype: Precision,
    /// Sequence length T of a denoising step (and the AR step's context).
    #[arg(long, default_value_t = 256)]
    pub tokens: i64,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Parameters of the extrapolation target.
    #[arg(long, default_value_t = 75.8e9)]
    pub target_params: f64,
    /// Width d of the extrapolation target.
    #[arg(long, default_value_t = 8192)]
    pub target_d: i64,
    /// Hosts the target is split over (one diffusion block, or a pipeline stage, each).
    #[arg(long, default_value_t = 3)]
    pub hosts: i64,
    /// Denoising steps each block takes.
    #[arg(long, default_value_t = 32)]
    pub steps_per_block: i64,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-layers.json")]
    pub json: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// The benchmark's shape at width `d`.
fn shape(d: i64, layers: i64, precision: Precision, tokens: i64) -> Result<LogicalShape> {
    let heads = (d / 128).max(1);
    let spec = format!(
        "d={d},layers={layers},heads={heads},mlp=4,dtype={precision},window={}",
        tokens + 1
    );
    Ok(spec.parse()?)
}

fn denoise_flops(s: &LogicalShape, t: i64) -> f64 {
    2.0 * (s.params_per_layer() * t) as f64 + 4.0 * (t * t * s.d_model) as f64
}

fn ar_flops(s: &LogicalShape, t: i64) -> f64 {
    2.0 * s.params_per_layer() as f64 + 4.0 * (t * s.d_model) as f64
}

/// Runs `args`.
pub fn run(args: BenchLayersArgs) -> Result<()> {
    if args.shapes.is_empty() || args.reps == 0 || args.tokens < 2 || args.hosts < 1 {
        bail!("need --shapes, --reps >= 1, --tokens >= 2 and --hosts >= 1");
    }
    let device = args.device.setup()?;
    if args.dtype == Precision::F16 && device == Device::Cpu {
        eprintln!("note: f16 matmuls on CPU take a slow path (~10x below bf16 on the dev host); bf16 is the fast low precision");
    }
    let _no_grad = tch::no_grad_guard();
    let mut rows = Vec::new();
    for &d in &args.shapes {
        let s = shape(d, 1, args.dtype, args.tokens)?;
        eprintln!("bench layers: d={d} ...");
        reset_peak_rss();
        rows.push(measure(&s, args.tokens, args.reps, device));
    }
    let largest = rows
        .iter()
        .max_by_key(|r| r["d"].as_i64())
        .cloned()
        .unwrap_or(Value::Null);
    let target = extrapolate(&args, &largest)?;
    let memory = memory_fit(&args, &target);
    print_report(&args, &rows, &target, &memory);
    let doc = json!({
        "bench": "layers", "device": format!("{device:?}"), "threads": tch::get_num_threads(),
        "dtype": args.dtype.to_string(), "tokens": args.tokens, "reps": args.reps,
        "rows": rows, "target": target, "memory": memory,
        "formulas": {
            "denoise_flops": "2*P*T + 4*T^2*d", "ar_flops": "2*P + 4*T*d",
            "diffusion_s": "hosts * layers_per_host * steps_per_block * t_denoise",
            "ar_s": "T * total_layers * t_ar",
            "t_at_target": "flops(target d) / GFLOP/s measured at the largest d",
        },
    });
    std::fs::write(&args.json, serde_json::to_vec_pretty(&doc)?)?;
    eprintln!("wrote {}", args.json.display());
    Ok(())
}

/// Median seconds of `reps` runs of `f` after one warm-up.
fn time(reps: usize, device: Device, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn measure(s: &LogicalShape, t: i64, reps: usize, device: Device) -> Value {
    let kind = s.precision.kind();
    let x = Tensor::randn([1, t, s.d_model], (kind, device));
    let t_denoise = {
        let (_vs, net) = s.build(device, 0, false);
        time(reps, device, || {
            let _ = net.forward_layers(0..1, &x);
        })
    };
    let t_ar = {
        let (_vs, net) = s.build(device, 0, true);
        let mut context = KvCache::new();
        let _ = net.forward_layers_cached(0..1, &x, &mut context);
        let step = Tensor::randn([1, 1, s.d_model], (kind, device));
        time(reps, device, || {
            // A fresh copy each time, so every step sees exactly T cached positions.
            let mut cache = context.clone();
            let _ = net.forward_layers_cached(0..1, &step, &mut cache);
        })
    };
    json!({
        "d": s.d_model, "heads": s.n_heads, "params_per_layer": s.params_per_layer(),
        "layer_mib": (s.params_per_layer() * s.precision.size()) as f64 / 1048576.0,
        "denoise_s": t_denoise, "denoise_gflops": denoise_flops(s, t) / t_denoise / 1e9,
        "ar_step_s": t_ar, "ar_gflops": ar_flops(s, t) / t_ar / 1e9,
        "peak_rss_mib": vm_hwm_mib(),
    })
}

fn extrapolate(args: &BenchLayersArgs, largest: &Value) -> Result<Value> {
    let s = shape(args.target_d, 1, args.dtype, args.tokens)?;
    let total = s.layers_for(args.target_params);
    let per_host = (total + args.hosts - 1) / args.hosts;
    let full = LogicalShape {
        n_layers: total,
        ..s.clone()
    };
    let (gf_denoise, gf_ar) = (
        largest["denoise_gflops"].as_f64().unwrap_or(f64::NAN),
        largest["ar_gflops"].as_f64().unwrap_or(f64::NAN),
    );
    let t_denoise = denoise_flops(&s, args.tokens) / (gf_denoise * 1e9);
    let t_ar = ar_flops(&s, args.tokens) / (gf_ar * 1e9);
    let diffusion = (args.hosts * per_host * args.steps_per_block) as f64 * t_denoise;
    let ar = (args.tokens * total) as f64 * t_ar;
    Ok(json!({
        "shape": full.to_string(), "params": full.params(), "bytes": full.bytes(),
        "total_layers": total, "hosts": args.hosts, "layers_per_host": per_host,
        "host_bytes": per_host * s.params_per_layer() * s.precision.size(),
        "scaled_from_d": largest["d"], "denoise_gflops": gf_denoise, "ar_gflops": gf_ar,
        "t_layer_denoise_s": t_denoise, "t_layer_ar_s": t_ar,
        "output_bytes": args.tokens, "steps_per_block": args.steps_per_block,
        "diffusion_s": diffusion, "ar_s": ar,
        "diffusion_bytes_per_s": args.tokens as f64 / diffusion,
        "ar_bytes_per_s": args.tokens as f64 / ar,
    }))
}

/// What fits in the memory this machine has free now (weights only; nothing allocated).
fn memory_fit(args: &BenchLayersArgs, target: &Value) -> Value {
    let avail = mem_available_bytes();
    let mut largest_d = None;
    let mut d = 128;
    while let Ok(s) = shape(d, 1, args.dtype, args.tokens) {
        if avail.is_none_or(|a| s.bytes() > a) {
            break;
        }
        largest_d = Some(d);
        d += 128;
    }
    let fits = |b: Option<i64>| match (avail, b) {
        (Some(a), Some(b)) => json!(b <= a),
        _ => Value::Null,
    };
    let one_layer_target = shape(args.target_d, 1, args.dtype, args.tokens)
        .map(|s| s.bytes())
        .ok();
    json!({
        "mem_available_bytes": avail,
        "largest_d_one_layer_block": largest_d,
        "target_one_layer_block_fits": fits(one_layer_target),
        "target_host_share_fits": fits(target["host_bytes"].as_i64()),
    })
}

fn print_report(args: &BenchLayersArgs, rows: &[Value], target: &Value, memory: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "### Per-layer serving cost ({}, T = {}, {} threads, median of {})\n",
        args.dtype,
        args.tokens,
        tch::get_num_threads(),
        args.reps
    );
    println!("| d | heads | params/layer | layer MiB | denoise s/layer | denoise GFLOP/s | AR step s/layer | AR GFLOP/s | peak RSS MiB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.5} | {:.1} | {:.6} | {:.2} | {:.0} |",
            r["d"],
            r["heads"],
            r["params_per_layer"],
            f(&r["layer_mib"]),
            f(&r["denoise_s"]),
            f(&r["denoise_gflops"]),
            f(&r["ar_step_s"]),
            f(&r["ar_gflops"]),
            f(&r["peak_rss_mib"]),
        );
    }
    let t = target;
    println!(
        "\n### Extrapolated to {} ({:.2}e9 params, {:.1} GiB)\n",
        t["shape"].as_str().unwrap_or("?"),
        f(&t["params"]) / 1e9,
        f(&t["bytes"]) / 1073741824.0
    );
    println!(
        "Layers L = {}, {} per host on {} hosts ({:.1} GiB of weights per host); \
         per-layer times = FLOPs at d {} / GFLOP/s measured at d {}.\n",
        t["total_layers"],
        t["layers_per_host"],
        t["hosts"],
        f(&t["host_bytes"]) / 1073741824.0,
        args.target_d,
        t["scaled_from_d"]
    );
    println!(
        "| system | formula | per-layer s | compute s per {} bytes | bytes/s |",
        args.tokens
    );
    println!("|---|---|---:|---:|---:|");
    println!(
        "| diffusion | hosts x L/hosts x steps ({}) x t_denoise | {:.4} | {:.1} | {:.2} |",
        args.steps_per_block,
        f(&t["t_layer_denoise_s"]),
        f(&t["diffusion_s"]),
        f(&t["diffusion_bytes_per_s"])
    );
    println!(
        "| AR | T x L x t_ar | {:.5} | {:.1} | {:.2} |",
        f(&t["t_layer_ar_s"]),
        f(&t["ar_s"]),
        f(&t["ar_bytes_per_s"])
    );
    let yes = |v: &Value| match v.as_bool() {
        Some(true) => "fits",
        Some(false) => "doesn't fit",
        None => "unknown",
    };
    println!(
        "\nFree memory (MemAvailable): {:.1} GiB. Largest d whose whole 1-layer block fits: {}. 1-layer block at d {}: {}. One host's share of the target: {}.",
        f(&memory["mem_available_bytes"]) / 1073741824.0,
        memory["largest_d_one_layer_block"],
        args.target_d,
        yes(&memory["target_one_layer_block_fits"]),
        yes(&memory["target_host_share_fits"]),
    );
    println!("Compute only: link latency and transfer are not included (see `bench inference`).");
}

/// Resets this process's peak RSS (VmHWM) so each shape reports its own peak.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn proc_kb(file: &str, key: &str) -> Option<i64> {
    std::fs::read_to_string(file).ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<i64>().ok())
    })
}

fn vm_hwm_mib() -> f64 {
    proc_kb("/proc/self/status", "VmHWM:").map_or(f64::NAN, |kb| kb as f64 / 1024.0)
}

fn mem_available_bytes() -> Option<i64> {
    proc_kb("/proc/meminfo", "MemAvailable:").map(|kb| kb * 1024)
}
