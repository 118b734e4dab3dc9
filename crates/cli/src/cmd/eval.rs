//! `blocktrain eval`: on non-overlapping windows of the valid and/or test split (never
//! training data), per block and in total with standard errors:
//! - an honest bound in nats and bits per byte: the ELBO (masked family), the VDM bound
//!   with its prior, diffusion and reconstruction terms (embedding family), or the exact
//!   NLL (AR);
//! - the paper's metric: the denoising CE of the clean byte with the noise level drawn
//!   from the training distribution (for the masked family it equals the ELBO);
//! - optionally (`--curve N`) that CE against the noise level.
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
    /// Also print the CE against the noise level at N points (t for masked diffusion,
    /// sigma for embedding diffusion), on at most 256 of the windows.
    #[arg(long, default_value_t = 0)]
    pub curve: usize,
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
    let settings = EvalSettings {
        samples,
        batch,
        seed,
        device,
    };
    let report = if m.family.is_edm() {
        let nets: Vec<_> = (0..m.schedule.blocks())
            .map(|i| &trainers[m.part_for_interval(i)].net)
            .collect();
        let edm = m.model.edm.as_ref().expect("an edm run has edm settings");
        let pb = progress::bar(w * (samples * nets.len()) as u64, split.name());
        let r = eval::edm_bound(&nets, edm, &m.schedule, &windows, &settings, &mut |n| {
            pb.inc(n)
        });
        pb.finish_and_clear();
        r
    } else if m.family == Family::Ar {
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
        let r = eval::diffusion_elbo(&nets, &m.schedule, &windows, &settings, &mut |n| pb.inc(n));
        pb.finish_and_clear();
        r
    };
    Ok(report)
}

/// Prints one report as a table.
pub fn print_report(run: &RunDir, split: Split, r: &Report) {
    let m = &run.manifest;
    let edm = m.family.is_edm();
    println!(
        "{} [{}] {}: {} windows x {} bytes, {} draw(s) per window{}",
        m.plan.dataset.describe(),
        split.name(),
        match m.family {
            Family::Block | Family::Edm =>
                format!("{}, {} blocks", m.family.describe(), m.parts.len()),
            _ => m.family.describe().to_string(),
        },
        r.windows,
        m.model.window,
        r.samples,
        if m.family == Family::Ar {
            ""
        } else {
            " and block"
        }
    );
    let level = if edm { "sigma" } else { "t" };
    for (i, s) in r.shares.iter().enumerate() {
        let ce = s.ce.map_or(String::new(), |c| {
            format!("   paper CE {:.4} ± {:.4}", c.nats, c.se)
        });
        println!(
            "  block {} {level} [{:.3}, {:.3}]  bound share {:.4} ± {:.4} nats/byte{ce}",
            i + 1,
            s.lo,
            s.hi,
            s.nats,
            s.se,
        );
    }
    if let Some(t) = &r.terms {
        println!(
            "  bound terms: prior {:.4} ± {:.4} (block {}), diffusion {:.4} ± {:.4}, reconstruction {:.4} ± {:.4} (block 1)",
            t.prior.nats,
            t.prior.se,
            r.shares.len(),
            t.diffusion.nats,
            t.diffusion.se,
            t.reconstruction.nats,
            t.reconstruction.se
        );
    }
    let what = match m.family {
        Family::Ar => "exact NLL",
        Family::Edm | Family::EdmE2e => "VDM bound (upper bound on NLL)",
        _ => "ELBO (upper bound on NLL)",
    };
    println!(
        "  total {what}: {:.4} ± {:.4} nats/byte = {:.4} bits/byte",
        r.nats,
        r.se,
        r.bits()
    );
    if let Some(c) = r.ce {
        let note = if edm {
            "denoising CE, sigma from the training lognormal: not a likelihood"
        } else {
            "mean masked CE over t ~ U[0, 1]: equal to the ELBO for this family"
        };
        println!("  paper CE: {:.4} ± {:.4} nats/byte ({note})", c.nats, c.se);
    }
    if r.se.is_nan() || r.se > 0.005 {
        println!("  note: standard error above 0.005; raise --samples or drop --max-windows");
    }
}

/// The CE against the noise level: (level, nats per byte, standard error).
pub fn curve(
    run: &RunDir,
    split: Split,
    points: usize,
    device: Device,
) -> Result<Vec<(f64, f64, f64)>> {
    let m = &run.manifest;
    if m.family == Family::Ar {
        bail!("--curve needs a diffusion run (masked or edm)");
    }
    let bytes = m.plan.dataset.load(split)?;
    let windows = heldout_windows(&bytes, m.model.window, 256);
    let trainers = (0..m.parts.len())
        .map(|p| run.trained(p, device))
        .collect::<Result<Vec<_>, _>>()?;
    let bounds = match &m.model.edm {
        Some(edm) => edm.sigma_bounds(&m.schedule),
        None => m.schedule.boundaries.clone(),
    };
    // The network that owns a level: the block whose interval holds it.
    let owner = |level: f64| {
        let idx = bounds
            .windows(2)
            .position(|w| level <= w[1])
            .unwrap_or(bounds.len() - 2);
        &trainers[m.part_for_interval(idx)].net
    };
    let settings = EvalSettings {
        samples: 1,
        batch: 64,
        seed: 1234,
        device,
    };
    Ok(match &m.model.edm {
        Some(edm) => eval::edm_ce_curve(&owner, edm, &windows, points, &settings)
            .into_iter()
            .map(|(s, e)| (s, e.nats, e.se))
            .collect(),
        None => eval::ce_curve(&owner, &windows, points, 64, 1234, device)
            .into_iter()
            .map(|(t, g)| (t, g, f64::NAN))
            .collect(),
    })
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
        let mut entry = json!({"split": split, "report": r});
        if args.curve > 0 {
            let points = curve(&run, split, args.curve, device)?;
            let level = if run.manifest.family.is_edm() {
                "sigma"
            } else {
                "t"
            };
            println!("  CE against {level} ({} windows):", 256.min(r.windows));
            for (l, ce, se) in &points {
                println!("    {level} {l:8.4}  CE {ce:.4} ± {se:.4}");
            }
            entry["curve"] = json!(points
                .iter()
                .map(|(l, ce, se)| json!({level: l, "ce": ce, "se": se}))
                .collect::<Vec<_>>());
        }
        out.push(entry);
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
