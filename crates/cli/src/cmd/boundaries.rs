//! `blocktrain boundaries`: equal-ELBO-share interval boundaries from a pilot model.
//!
//! Equal slices of t give blocks very unequal shares of the loss (most of it sits at
//! high masking rates). This measures the masked CE g(t) of a trained run on held-out
//! valid windows and prints boundaries where each block owns the same share of the
//! ELBO, ready for `blocktrain train --boundaries`.
use std::path::PathBuf;

use anyhow::{bail, Result};
use blocktrain_model::data::{heldout_windows, Split};
use blocktrain_model::eval;
use blocktrain_model::run::{Family, RunDir};
use clap::Args;

use crate::args::DeviceArgs;

/// Flags of `blocktrain boundaries`.
#[derive(Args, Debug)]
pub struct BoundariesArgs {
    /// A trained diffusion run (E2E or block) used as the pilot.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Number of blocks to split into.
    #[arg(long, default_value_t = 3)]
    pub blocks: usize,
    /// Cells of the t grid.
    #[arg(long, default_value_t = 20)]
    pub grid: usize,
    /// Valid windows used (evenly spaced).
    #[arg(long, default_value_t = 512)]
    pub max_windows: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `blocktrain boundaries`.
pub fn run(args: BoundariesArgs) -> Result<()> {
    let device = args.device.setup()?;
    let run = RunDir::open(&args.checkpoint)?;
    let m = &run.manifest;
    if m.family == Family::Ar {
        bail!("the pilot must be a masked-diffusion run (e2e or block), not AR");
    }
    if m.family.is_edm() {
        bail!(
            "equal-ELBO-share boundaries are for the masked family; edm blocks split the \
             lognormal's mass equally (the default), and `train --boundaries` takes mass fractions"
        );
    }
    if args.blocks == 0 || args.grid < args.blocks {
        bail!("need --blocks >= 1 and --grid >= --blocks");
    }
    let trainers = (0..m.parts.len())
        .map(|p| run.trained(p, device))
        .collect::<Result<Vec<_>, _>>()?;
    let windows = heldout_windows(
        &m.plan.dataset.load(Split::Valid)?,
        m.model.window,
        args.max_windows,
    );
    let owner = |t: f64| {
        let idx = (0..m.schedule.blocks())
            .find(|&i| t <= m.schedule.interval(i).1)
            .unwrap_or(0);
        &trainers[m.part_for_interval(idx)].net
    };
    let curve = eval::ce_curve(&owner, &windows, args.grid, 64, 99, device);
    println!("masked CE g(t) on valid ({} windows):", windows.size()[0]);
    for (t, g) in &curve {
        println!("  t={t:.3}  {g:.4} nats/masked byte");
    }
    let b = eval::equal_share_boundaries(&curve, args.blocks);
    let text: Vec<String> = b.iter().map(|v| format!("{v}")).collect();
    println!(
        "equal-ELBO-share boundaries: --boundaries {}",
        text.join(",")
    );
    Ok(())
}
