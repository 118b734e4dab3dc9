//! `blocktrain demo`: the README's first command. Trains every block briefly on the
//! shipped WikiText-2, evaluates on held-out valid windows, prints a sample.
//! Running it again reuses the finished run (nothing is retrained or lost).
use std::path::PathBuf;

use anyhow::{bail, Result};
use blocktrain_model::data::Split;
use blocktrain_model::run::RunDir;
use clap::Args;

use crate::args::DeviceArgs;
use crate::cmd::{eval, generate, train};
use crate::profile::Profile;

/// Flags of `blocktrain demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size preset (tiny takes seconds, demo a few minutes on 2 cores).
    #[arg(long, value_enum, default_value = "demo")]
    pub profile: Profile,
    /// Number of blocks.
    #[arg(long, default_value_t = 3)]
    pub blocks: usize,
    /// Run directory.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Training data: wikitext2, shakespeare, or a file path.
    #[arg(long, default_value = "wikitext2")]
    pub data: String,
    /// Prompt of the printed sample.
    #[arg(long, default_value = " = The ")]
    pub prompt: String,
    /// Bytes in the printed sample.
    #[arg(long, default_value_t = 96)]
    pub len: usize,
    /// Seed of data order, masks, weights and sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `blocktrain demo`.
pub fn run(args: DemoArgs) -> Result<()> {
    let device = args.device.setup()?;
    let train_args = train::TrainArgs {
        objective: train::ObjectiveArg::Block,
        blocks: args.blocks,
        block: None,
        boundaries: None,
        profile: args.profile,
        steps: None,
        batch: None,
        window: None,
        layers: None,
        block_layers: None,
        d_model: None,
        heads: None,
        lr: None,
        t_cond: false,
        seed: args.seed,
        data: args.data.clone(),
        out: args.out.clone(),
        resume: false,
        save_every: 50,
        device: args.device.clone(),
    };
    let wanted = train_args.manifest()?;
    let mut run = if args.out.join("run.json").exists() {
        let existing = RunDir::open_writer(&args.out)?;
        let m = &existing.manifest;
        let same = m.family == wanted.family
            && m.model == wanted.model
            && m.plan == wanted.plan
            && m.schedule == wanted.schedule
            && m.optim == wanted.optim;
        if !same {
            bail!(
                "{} holds a different run; pass --out to use another directory",
                args.out.display()
            );
        }
        eprintln!("continuing the run in {}", args.out.display());
        existing
    } else {
        RunDir::create(&args.out, wanted)?
    };

    println!("== 1/3 train {} blocks ({:?} profile, each block on its own interval, no gradient between blocks)", args.blocks, args.profile);
    let data = run.manifest.plan.dataset.load(Split::Train)?;
    for part in 0..run.manifest.parts.len() {
        train::train_part(&mut run, part, &data, device, train_args.save_every)?;
    }
    train::print_budget(&run.manifest);

    println!("== 2/3 evaluate on held-out data");
    let windows = args.profile.preset().eval_windows;
    let report = eval::evaluate(&run, Split::Valid, 1, windows, 64, 1234, device)?;
    eval::print_report(&run, Split::Valid, &report);

    println!("== 3/3 sample: one pass through blocks {}..1", args.blocks);
    let gen = generate::GenerateArgs {
        checkpoint: args.out.clone(),
        prompt: args.prompt.clone(),
        len: args.len,
        steps_per_block: 32,
        temperature: 0.8,
        top_k: 0,
        seed: args.seed as i64,
        device: args.device.clone(),
    };
    let out = generate::sample(&run, &gen, device)?;
    println!("{}{}", args.prompt, String::from_utf8_lossy(&out));
    println!(
        "\nrun directory: {} (try `blocktrain eval --checkpoint {}`)",
        args.out.display(),
        args.out.display()
    );
    Ok(())
}
