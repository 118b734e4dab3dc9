//! `blocktrain judge`: sample quality of generators under one AR judge.
//!
//! Each generator (a run of any family) draws `--samples` unconditional samples of
//! `--len` bytes (seeds `--seed`, `--seed + 1`, ...); diffusion runs do so at every step
//! count of `--steps`. The judge, a larger AR run trained separately
//! (`blocktrain train --objective ar --profile judge --blocks 1`) and never among the
//! generators, scores each sample's exact NLL per byte. A reference row scores real
//! held-out text the same way, and the byte-unigram entropy of each set of samples
//! shows repetition. Prints a table and writes JSON.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use blocktrain_model::data::{heldout_windows, Split};
use blocktrain_model::judge::{self, Quality};
use blocktrain_model::run::{Family, RunDir};
use blocktrain_model::sampler::SampleSettings;
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::args::DeviceArgs;
use crate::progress;

/// Where the reference text comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReferenceSplit {
    /// Validation split (for choosing settings, such as the step count).
    Valid,
    /// Test split (for reported numbers).
    Test,
}

/// Flags of `blocktrain judge`.
#[derive(Args, Debug)]
pub struct JudgeArgs {
    /// The judge: an AR run with a window of at least --len bytes.
    #[arg(long)]
    pub judge: PathBuf,
    /// A generator to score (repeat the flag for more): a run directory of any family.
    #[arg(long = "checkpoint", required = true)]
    pub checkpoints: Vec<PathBuf>,
    /// Denoising steps per block to try for diffusion generators, e.g. `4,8,16,32`.
    #[arg(long, default_value = "8,16,32")]
    pub steps: String,
    /// Samples per generator and step count.
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    /// Bytes per sample.
    #[arg(long, default_value_t = 256)]
    pub len: usize,
    /// Sampling temperature for every generator.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Embedding diffusion: Heun steps instead of Euler's.
    #[arg(long)]
    pub heun: bool,
    /// Split of the reference row (real text scored by the judge).
    #[arg(long, value_enum, default_value = "valid")]
    pub split: ReferenceSplit,
    /// Seed of the first sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn row(name: &str, family: &str, steps: &str, q: &Quality, secs: f64) -> String {
    format!(
        "| {name} | {family} | {steps} | {:.4} ± {:.4} | {:.3} | {secs:.2} |",
        q.nll.nats, q.nll.se, q.unigram_bits
    )
}

/// Runs `blocktrain judge`.
pub fn run(args: JudgeArgs) -> Result<()> {
    if args.samples < 2 || args.len < 2 {
        bail!("--samples and --len must be at least 2");
    }
    if !(args.temperature.is_finite() && args.temperature > 0.0) {
        bail!("--temperature must be positive");
    }
    let steps: Vec<usize> = args
        .steps
        .split(',')
        .map(|v| v.trim().parse::<usize>().ok().filter(|&s| s > 0))
        .collect::<Option<_>>()
        .with_context(|| {
            format!(
                "--steps '{}': positive integers, comma-separated",
                args.steps
            )
        })?;
    let device = args.device.setup()?;
    let judge_run = RunDir::open(&args.judge)?;
    if judge_run.manifest.family != Family::Ar {
        bail!("--judge {} is not an AR run", args.judge.display());
    }
    let judge_net = judge_run.trained(0, device)?;
    let jm = &judge_run.manifest;
    let judge_steps = jm.parts[0].steps_done;
    if judge_steps < jm.plan.steps {
        eprintln!(
            "note: the judge has trained {judge_steps} of its {} steps; its scores rank generators but are not the finished judge's",
            jm.plan.steps
        );
    }
    if (args.len as i64) > jm.model.window {
        bail!(
            "the judge's window is {} bytes, shorter than --len {}",
            jm.model.window,
            args.len
        );
    }
    let split = match args.split {
        ReferenceSplit::Valid => Split::Valid,
        ReferenceSplit::Test => Split::Test,
    };
    let text = jm.plan.dataset.load(split)?;
    let windows = heldout_windows(&text, args.len as i64, args.samples);
    let real: Vec<Vec<u8>> = (0..windows.size()[0])
        .map(|i| {
            let v: Vec<i64> = Vec::try_from(windows.get(i)).expect("int64 bytes");
            v.into_iter().map(|b| b as u8).collect()
        })
        .collect();
    let reference = judge::judge(&judge_net.net, &real, 16, device)?;
    println!(
        "judge: {} ({} layers, width {}, window {}); {} samples x {} bytes per row, temperature {}",
        args.judge.display(),
        jm.model.n_layers,
        jm.model.d_model,
        jm.model.window,
        args.samples,
        args.len,
        args.temperature
    );
    println!("\n| generator | family | steps per block | judge NLL (nats/byte) | unigram bits/byte | s per sample |");
    println!("|---|---|---|---:|---:|---:|");
    let name = format!("real text ({})", split.name());
    println!("{}", row(&name, "held-out data", "—", &reference, 0.0));
    let mut rows = Vec::new();
    for dir in &args.checkpoints {
        if dir.canonicalize().ok() == args.judge.canonicalize().ok() {
            bail!(
                "{} is the judge: it cannot also be a generator",
                dir.display()
            );
        }
        let run = RunDir::open(dir)?;
        let m = &run.manifest;
        let trainers = (0..m.parts.len())
            .map(|p| run.trained(p, device))
            .collect::<Result<Vec<_>, _>>()?;
        let parts: Vec<_> = trainers.iter().map(|t| &t.net).collect();
        if args.len as i64 > m.model.window {
            eprintln!(
                "note: {} was trained on {}-byte windows; its {}-byte samples run past them",
                dir.display(),
                m.model.window,
                args.len
            );
        }
        let counts: Vec<Option<usize>> = if m.family == Family::Ar {
            vec![None]
        } else {
            steps.iter().map(|&s| Some(s)).collect()
        };
        for count in counts {
            let settings = SampleSettings {
                steps_per_block: count.unwrap_or(1),
                temperature: args.temperature,
                top_k: 0,
                top_p: 1.0,
                heun: args.heun,
            };
            let label = count.map_or("—".to_string(), |c| c.to_string());
            let pb = progress::bar(args.samples as u64, &format!("{label} steps"));
            let started = Instant::now();
            let samples: Vec<Vec<u8>> = (0..args.samples as u64)
                .map(|i| {
                    let s = super::generate::local(
                        m,
                        &parts,
                        b"",
                        args.len,
                        &settings,
                        args.seed + i,
                        device,
                    );
                    pb.inc(1);
                    s
                })
                .collect();
            pb.finish_and_clear();
            let secs = started.elapsed().as_secs_f64() / args.samples as f64;
            let q = judge::judge(&judge_net.net, &samples, 16, device)?;
            println!(
                "{}",
                row(
                    &dir.display().to_string(),
                    m.family.describe(),
                    &label,
                    &q,
                    secs
                )
            );
            rows.push(json!({
                "checkpoint": dir, "family": m.family, "steps_per_block": count,
                "heun": args.heun && m.family.is_edm(), "seconds_per_sample": secs,
                "quality": q,
                "first_sample": String::from_utf8_lossy(&samples[0]),
            }));
        }
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "judge": {"checkpoint": args.judge, "model": jm.model, "plan": jm.plan, "steps_done": judge_steps},
            "samples": args.samples, "len": args.len, "temperature": args.temperature,
            "seed": args.seed, "reference": {"split": split, "quality": reference},
            "rows": rows,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
