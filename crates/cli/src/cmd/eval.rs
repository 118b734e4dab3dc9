//! `blocktrain eval`: held-out ELBO per interval and in total (diffusion), or exact NLL
//! (AR), on non-overlapping windows of the valid and/or test split. Never training data.
use std::path::PathBuf;

use anyhow::{bail, Result};
use blocktrain_model::data::{heldout_windows, Split};
use blocktrain_model::eval::{self, EvalSettings, Report};
use blocktrain_model::run::{Family, RunDir};
use clap::{Args, ValueEnum};
use serde_json::json;
use tch::Device;

use crate::args::DeviceArgs;
use crate::progress;

/// Which held-out split(s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    /// Validation split (for choices).
    Valid,
    /// Test split (for reported numbers).
    Test,
    /// Both.
    Both,
}

/// Flags of `blocktrain eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Run directory written by `blocktrain train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Held-out split(s) to score.
    #[arg(long, value_enum, default_value = "both")]
    pub split: SplitArg,
    /// Monte-Carlo (t, mask) draws per window and interval.
    #[arg(long, default_value_t = 2)]
    pub samples: usize,
    /// Evenly spaced subset of windows (0 = every window of the split).
    #[arg(long, default_value_t = 0)]
    pub max_windows: usize,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch: i64,
    /// Seed of the evaluation masks (fixed, so runs are comparable).
    #[arg(long, default_value_t = 1234)]
    pub seed: i64,
    /// Also write the reports as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Scores `run` on one held-out split.
pub fn evaluate(
    run: &RunDir,
    split: Split,
    samples: usize,
    max_windows: usize,
    batch: i64,
    seed: i64,
    device: Device,
) -> Result<Report> {
    if samples == 0 || batch < 1 {
        bail!("--samples and --batch must be at least 1");
    }
    let m = &run.manifest;
    let bytes = m.plan.dataset.load(split)?;
    let windows = heldout_windows(&bytes, m.model.window, max_windows);
    let w = windows.size()[0] as u64;
    if w == 0 {
        bail!(
            "the {} split has {} bytes, less than one window of {}",
            split.name(),
            bytes.len(),
            m.model.window
        );
    }
    let trainers = (0..m.parts.len())
        .map(|p| run.trained(p, device))
        .collect::<Result<Vec<_>, _>>()?;
    let report = if m.family == Family::Ar {
        let pb = progress::bar(w, split.name());
        let r = eval::ar_nll(&trainers[0].net, &windows, batch, device, &mut |n| {
            pb.inc(n)
        });
        pb.finish_and_clear();
        r
    } else {
        let nets: Vec<_> = (0..m.schedule.blocks())
            .map(|i| &trainers[m.part_for_interval(i)].net)
            .collect();
        let pb = progress::bar(w * (samples * nets.len()) as u64, split.name());
        let r = eval::diffusion_elbo(
            &nets,
            &m.schedule,
            &windows,
            &EvalSettings {
                samples,
                batch,
                seed,
                device,
            },
            &mut |n| pb.inc(n),
        );
        pb.finish_and_clear();
        r
    };
    Ok(report)
}

/// Prints one report as a table.
pub fn print_report(run: &RunDir, split: Split, r: &Report) {
    let m = &run.manifest;
    println!(
        "{} [{}] {}: {} windows x {} bytes, {} draw(s) per window{}",
        m.plan.dataset.describe(),
        split.name(),
        match m.family {
            Family::Block => format!("block-local model, {} blocks", m.parts.len()),
            Family::E2e => "E2E diffusion reference".into(),
            Family::Ar => "AR reference".into(),
        },
        r.windows,
        m.model.window,
        r.samples,
        if m.family == Family::Ar {
            ""
        } else {
            " and interval"
        }
    );
    for (i, s) in r.shares.iter().enumerate() {
        println!(
            "  interval {} [{:.3}, {:.3}]  {:.4} ± {:.4} nats/byte",
            i + 1,
            s.lo,
            s.hi,
            s.nats,
            s.se
        );
    }
    let what = if m.family == Family::Ar {
        "exact NLL"
    } else {
        "ELBO (upper bound on NLL)"
    };
    println!(
        "  total {what}: {:.4} ± {:.4} nats/byte = {:.4} bits/byte",
        r.nats,
        r.se,
        r.bits()
    );
    if r.se.is_nan() || r.se > 0.005 {
        println!("  note: standard error above 0.005; raise --samples or drop --max-windows");
    }
}

/// Runs `blocktrain eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    let device = args.device.setup()?;
    let run = RunDir::open(&args.checkpoint)?;
    let splits = match args.split {
        SplitArg::Valid => vec![Split::Valid],
        SplitArg::Test => vec![Split::Test],
        SplitArg::Both => vec![Split::Valid, Split::Test],
    };
    let mut out = Vec::new();
    for split in splits {
        let r = evaluate(
            &run,
            split,
            args.samples,
            args.max_windows,
            args.batch,
            args.seed,
            device,
        )?;
        print_report(&run, split, &r);
        out.push(json!({"split": split, "report": r}));
    }
    if let Some(path) = &args.json {
        let m = &run.manifest;
        let doc = json!({
            "checkpoint": args.checkpoint, "family": m.family, "dataset": m.plan.dataset.describe(),
            "model": m.model, "schedule": m.schedule, "plan": m.plan, "parts": m.parts, "results": out,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
