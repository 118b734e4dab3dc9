//! `blocktrain bench optimizer-state`: what it costs to start every lease from fresh
//! AdamW moments, measured in one process with everything else as a network run has it.
//!
//! Each arm trains every block for `rounds` leases of H steps, one worker per block,
//! exactly as `bench network --workers B` does over HTTP: the lease seeds, schedule
//! positions and shards the coordinator would hand out, the base each round decoded from
//! the run's checkpoint codec, the delta sent through the update codec with the worker's
//! error feedback and added to the fp32 master. Only the moments a lease starts from
//! differ:
//! - `fresh`: zero moments every lease (the network default before issue 14);
//! - `carry`: the previous lease's end moments, exact (what a worker keeping its own
//!   state would have);
//! - `carry-fp16`, `carry-int8`: the same moments after a round trip through that codec,
//!   as a coordinator storing and serving the block's optimizer state would ship them.
//!
//! The held-out CE (valid to select, test to report) and the bytes a worker would move
//! per round, counted from the encoded blobs, are printed and written as JSON.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use blocktrain_model::data::Split;
use blocktrain_model::run::RunDir;
use blocktrain_protocol::codec::{self, Arrays, Codec, ErrorFeedback};
use blocktrain_protocol::wire::Lease;
use blocktrain_train::tensors::to_arrays;
use blocktrain_train::worker::{shard_of, train_delta, LocalJob};
use clap::Args;
use serde_json::json;

use crate::args::DeviceArgs;
use crate::cmd::bench_network::ce;
use crate::cmd::demo::{DemoArgs, FamilyArg};
use crate::profile::Profile;

/// Flags of `blocktrain bench optimizer-state`.
#[derive(Args, Debug)]
pub struct BenchOptimArgs {
    /// Arms to run, comma-separated: fresh, carry, carry-fp16, carry-int8.
    #[arg(long, default_value = "fresh,carry,carry-fp16,carry-int8")]
    pub arms: String,
    /// Blocks.
    #[arg(long, default_value_t = 3)]
    pub blocks: usize,
    /// Local steps per lease (H).
    #[arg(long, default_value_t = 50)]
    pub local_steps: i64,
    /// Steps per block in all (rounds = this / H).
    #[arg(long, default_value_t = 600)]
    pub steps_per_block: i64,
    /// Model and optimizer preset.
    #[arg(long, value_enum, default_value = "demo")]
    pub profile: Profile,
    /// Objective family.
    #[arg(long, value_enum, default_value = "masked")]
    pub objective: FamilyArg,
    /// Update codec.
    #[arg(long, default_value = "fp16")]
    pub codec: String,
    /// Held-out windows per split (0 = the whole split).
    #[arg(long, default_value_t = 2000)]
    pub eval_windows: usize,
    /// Directory for the arms' model directories (must not exist yet).
    #[arg(long, default_value = "runs/bench-optimizer-state")]
    pub out: PathBuf,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-optimizer-state.json")]
    pub json: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// How an arm carries the moments from one lease to the next.
#[derive(Clone, Copy, Debug)]
enum Carry {
    Fresh,
    Exact,
    Through(Codec),
}

fn parse_arm(name: &str) -> Result<Carry> {
    Ok(match name {
        "fresh" => Carry::Fresh,
        "carry" => Carry::Exact,
        "carry-fp16" => Carry::Through(Codec::Fp16),
        "carry-int8" => Carry::Through(Codec::Int8 { chunk: 256 }),
        other => bail!("unknown arm '{other}' (fresh, carry, carry-fp16, carry-int8)"),
    })
}

fn roundtrip(a: &Arrays, c: Codec) -> Result<(Arrays, usize)> {
    let bytes = codec::encode(a, c);
    let shapes = codec::header_shapes(&bytes)?;
    Ok((codec::decode(&bytes, &shapes, usize::MAX)?.0, bytes.len()))
}

/// Bytes one worker moved in an arm, summed over its leases.
#[derive(Default)]
struct Bytes {
    weights_down: usize,
    delta_up: usize,
    moments_down: usize,
    moments_up: usize,
}

/// Runs `blocktrain bench optimizer-state`.
pub fn run(args: BenchOptimArgs) -> Result<()> {
    let device = args.device.setup()?;
    let arms: Vec<(String, Carry)> = args
        .arms
        .split(',')
        .map(|a| Ok((a.trim().to_string(), parse_arm(a.trim())?)))
        .collect::<Result<_>>()?;
    if args.out.exists() {
        bail!("{} exists; pass a new --out", args.out.display());
    }
    let demo = DemoArgs {
        profile: args.profile,
        objective: args.objective,
        blocks: args.blocks,
        workers: args.blocks,
        local_steps: Some(args.local_steps),
        codec: args.codec.clone(),
        out: None,
        data: "wikitext2".into(),
        prompt: String::new(),
        len: 0,
        seed: args.seed,
        device: args.device.clone(),
    };
    let mut cfg = demo.run_config()?;
    cfg.training.rounds = (args.steps_per_block / args.local_steps).max(1) as u64;
    cfg.validate()?;
    let manifest = cfg.manifest()?;
    let codec = Codec::parse(&cfg.wire.codec)?;
    let wire_codec = match cfg.wire.checkpoint_codec.as_str() {
        "fp16" => Codec::Fp16,
        "int8" => Codec::Int8 { chunk: 256 },
        _ => Codec::Fp32,
    };
    let corpus = manifest.plan.dataset.load(Split::Train)?;
    let rounds = cfg.training.rounds;
    println!(
        "== bench optimizer-state: {} blocks x {rounds} leases of {} steps, update codec {}, checkpoint codec {}",
        args.blocks, args.local_steps, cfg.wire.codec, cfg.wire.checkpoint_codec
    );
    let mut rows = Vec::new();
    for (name, carry) in &arms {
        let t0 = Instant::now();
        let dir = args.out.join(name);
        let mut model = RunDir::create(&dir, manifest.clone())?;
        let mut bytes = Bytes::default();
        for block in 0..args.blocks {
            let mut master = to_arrays(&model.trainer(block, tch::Device::Cpu)?.weights())?;
            let mut feedback = ErrorFeedback::default();
            let mut moments: Option<Arrays> = None;
            for version in 0..rounds {
                let (base, down) = roundtrip(&master, wire_codec)?;
                bytes.weights_down += down;
                let lease = lease_at(&cfg, block, version);
                let shard = shard_of(&corpus, 0, 1, manifest.model.window);
                let job = LocalJob {
                    manifest: &manifest,
                    block,
                    base: &base,
                    lease: &lease,
                    shard,
                    moments: moments.as_ref(),
                };
                let trained = train_delta(&job, device, &|| true)?.expect("no stop condition");
                let body = feedback.encode(&trained.delta, codec);
                bytes.delta_up += body.len();
                let (delta, _) = codec::decode(&body, &codec::header_shapes(&body)?, usize::MAX)?;
                for (k, a) in master.iter_mut() {
                    for (w, d) in a.data.iter_mut().zip(&delta[k].data) {
                        *w += d;
                    }
                }
                moments = match carry {
                    Carry::Fresh => None,
                    Carry::Exact => Some(trained.moments),
                    Carry::Through(c) => {
                        let (m, n) = roundtrip(&trained.moments, *c)?;
                        // Up after this lease, down before the next.
                        bytes.moments_up += n;
                        bytes.moments_down += n;
                        Some(m)
                    }
                };
                eprintln!(
                    "[{name}] block {} lease {}/{rounds}: loss {:.4}",
                    block + 1,
                    version + 1,
                    trained.loss
                );
            }
            let fp32 = codec::encode(&master, Codec::Fp32);
            model.save_weights(block, &fp32, rounds as i64 * args.local_steps)?;
        }
        drop(model);
        let valid = ce(&dir, Split::Valid, args.eval_windows, device)?;
        let test = ce(&dir, Split::Test, args.eval_windows, device)?;
        let leases = (args.blocks as u64 * rounds) as f64;
        let per_round = |b: usize| b as f64 / leases;
        println!(
            "[{name}] valid {:.4} ± {:.4}, test {:.4} ± {:.4} nats/byte ({:.0} s)",
            valid.0,
            valid.1,
            test.0,
            test.1,
            t0.elapsed().as_secs_f64()
        );
        rows.push(json!({
            "arm": name, "carry": format!("{carry:?}"),
            "valid": valid.0, "valid_se": valid.1, "test": test.0, "test_se": test.1,
            "bytes_per_lease": {
                "weights_down": per_round(bytes.weights_down), "delta_up": per_round(bytes.delta_up),
                "moments_down": per_round(bytes.moments_down), "moments_up": per_round(bytes.moments_up),
            },
            "seconds": t0.elapsed().as_secs_f64(),
        }));
    }
    print_table(&rows);
    let out = json!({
        "bench": "optimizer-state",
        "metric": "masked ELBO in nats/byte (edm: the paper's denoising CE), eval windows per split",
        "eval_windows": args.eval_windows, "blocks": args.blocks, "rounds": rounds,
        "local_steps": args.local_steps, "codec": cfg.wire.codec,
        "checkpoint_codec": cfg.wire.checkpoint_codec, "profile": format!("{:?}", args.profile),
        "objective": format!("{:?}", args.objective), "model": cfg.model, "rows": rows,
        "machine": format!("{} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&out)?)?;
    println!("wrote {}", args.json.display());
    Ok(())
}

/// The lease a coordinator of `cfg` issues for slot 0 of `block` at `version`.
fn lease_at(cfg: &blocktrain_train::config::RunConfig, block: usize, version: u64) -> Lease {
    let h = cfg.training.local_steps;
    Lease {
        id: 0,
        block,
        version,
        weights_hash: String::new(),
        steps: h,
        batch: cfg.training.batch,
        seed: blocktrain_train::core::seed_of(cfg.seed, block, version, 0),
        shard_index: 0,
        shard_count: 1,
        schedule_step: version as i64 * h,
        schedule_total: cfg.schedule_total(),
        schedule_span: h,
        codec: cfg.wire.codec.clone(),
        lease_ms: 60_000,
        public_shard: false,
        carry_moments: false,
    }
}

fn print_table(rows: &[serde_json::Value]) {
    println!("\n| arm | valid | test | KB down per lease | KB up per lease |");
    println!("|---|---:|---:|---:|---:|");
    for r in rows {
        let b = &r["bytes_per_lease"];
        let f = |k: &str| b[k].as_f64().unwrap_or(0.0) / 1024.0;
        println!(
            "| {} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.0} | {:.0} |",
            r["arm"].as_str().unwrap_or("?"),
            r["valid"].as_f64().unwrap_or(f64::NAN),
            r["valid_se"].as_f64().unwrap_or(f64::NAN),
            r["test"].as_f64().unwrap_or(f64::NAN),
            r["test_se"].as_f64().unwrap_or(f64::NAN),
            f("weights_down") + f("moments_down"),
            f("delta_up") + f("moments_up"),
        );
    }
}
