//! `blocktrain train`: block-local model (all blocks, or one as a worker would), or the
//! E2E / AR reference at the same total size, budget and data order.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use blocktrain_model::config::Schedule;
use blocktrain_model::data::{Dataset, Split, WindowSampler};
use blocktrain_model::flops;
use blocktrain_model::run::{Family, Manifest, RunDir, TrainPlan};
use clap::{Args, ValueEnum};
use tch::{Device, Kind, Tensor};

use crate::args::{parse_boundaries, DeviceArgs, EdmArgs};
use crate::profile::Profile;
use crate::progress;

/// Model family on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ObjectiveArg {
    /// B block-local masked-diffusion networks (our family).
    Block,
    /// One masked-diffusion network over all of [0, 1] with B x the layers.
    E2e,
    /// A causal next-byte network with B x the layers.
    Ar,
    /// B block-local embedding-diffusion networks with EDM (the BlockTrain paper's
    /// family, after DiffusionBlocks): equal lognormal sigma mass per block.
    Edm,
    /// One embedding-diffusion network over all of [sigma_min, sigma_max], B x the layers.
    EdmE2e,
}

impl From<ObjectiveArg> for Family {
    fn from(o: ObjectiveArg) -> Family {
        match o {
            ObjectiveArg::Block => Family::Block,
            ObjectiveArg::E2e => Family::E2e,
            ObjectiveArg::Ar => Family::Ar,
            ObjectiveArg::Edm => Family::Edm,
            ObjectiveArg::EdmE2e => Family::EdmE2e,
        }
    }
}

/// Flags of `blocktrain train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Which model to train.
    #[arg(long, value_enum, default_value = "block")]
    pub objective: ObjectiveArg,
    /// Number of blocks B (E2E and AR get B x the layers of one block).
    #[arg(long, default_value_t = 3)]
    pub blocks: usize,
    /// Train only block b (1-based): the unit one worker runs.
    #[arg(long)]
    pub block: Option<usize>,
    /// Interval boundaries, e.g. `0,0.25,0.6,1` (default: equal slices b/B): masking
    /// rates for the masked family, fractions of the lognormal's sigma mass for edm.
    #[arg(long)]
    pub boundaries: Option<String>,
    /// Size preset; the flags below override it.
    #[arg(long, value_enum, default_value = "demo")]
    pub profile: Profile,
    /// Optimizer steps per block (and for the reference).
    #[arg(long)]
    pub steps: Option<i64>,
    /// Windows per batch.
    #[arg(long)]
    pub batch: Option<i64>,
    /// Bytes per window.
    #[arg(long)]
    pub window: Option<i64>,
    /// Layers per block.
    #[arg(long)]
    pub layers: Option<i64>,
    /// Layers of each block, e.g. `3,2,1` (block objective; overrides --layers).
    #[arg(long)]
    pub block_layers: Option<String>,
    /// Model width.
    #[arg(long)]
    pub d_model: Option<i64>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<i64>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Condition each network on the masking level t.
    #[arg(long)]
    pub t_cond: bool,
    /// Seed of data order, masks and initial weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training data: wikitext2, shakespeare, or a file path (train split only is read).
    #[arg(long, default_value = "wikitext2")]
    pub data: String,
    /// Run directory (created; holds run.json and safetensors files).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last saved step (its own settings apply).
    #[arg(long)]
    pub resume: bool,
    /// Save a checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 250)]
    pub save_every: i64,
    #[command(flatten)]
    pub edm: EdmArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl TrainArgs {
    /// The manifest these flags describe.
    pub fn manifest(&self) -> Result<Manifest> {
        let preset = self.profile.preset();
        let mut model = preset.block.clone();
        model.window = self.window.unwrap_or(model.window);
        model.d_model = self.d_model.unwrap_or(model.d_model);
        model.n_heads = self.heads.unwrap_or(model.n_heads);
        model.t_cond = self.t_cond;
        let layers = self.layers.unwrap_or(model.n_layers);
        if self.blocks == 0 {
            bail!("--blocks must be at least 1");
        }
        let family = Family::from(self.objective);
        model.n_layers = if family.is_blocks() {
            layers
        } else {
            layers * self.blocks as i64
        };
        if family.is_edm() {
            model.edm = Some(self.edm.config(self.seed)?);
        } else if self.edm.any() {
            bail!(
                "--embed-dim, --sigma-* , --p-* and --overlap apply to --objective edm or edm-e2e"
            );
        }
        let schedule = match &self.boundaries {
            Some(b) => {
                let s = Schedule::from_boundaries(parse_boundaries(b)?)?;
                if s.blocks() != self.blocks {
                    bail!(
                        "--boundaries gives {} intervals but --blocks is {}",
                        s.blocks(),
                        self.blocks
                    );
                }
                s
            }
            None => Schedule::equal(self.blocks),
        };
        let mut optim = preset.optim.clone();
        optim.lr = self.lr.unwrap_or(optim.lr);
        let plan = TrainPlan {
            steps: self.steps.unwrap_or(preset.steps),
            batch: self.batch.unwrap_or(preset.batch),
            seed: self.seed,
            dataset: Dataset::parse(&self.data),
        };
        if plan.steps <= 0 || plan.batch <= 0 {
            bail!("--steps and --batch must be positive");
        }
        let manifest = Manifest::new(family, model, schedule, optim, plan)?;
        Ok(match &self.block_layers {
            Some(list) => {
                let layers = list
                    .split(',')
                    .map(|v| {
                        v.trim()
                            .parse::<i64>()
                            .map_err(|e| anyhow::anyhow!("bad --block-layers entry '{v}': {e}"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                manifest.with_block_layers(layers)?
            }
            None => manifest,
        })
    }
}

/// Runs `blocktrain train`.
pub fn run(args: TrainArgs) -> Result<()> {
    if args.save_every < 1 {
        bail!("--save-every must be at least 1");
    }
    let device = args.device.setup()?;
    let mut run = if args.resume {
        eprintln!(
            "resuming {}: the run's own settings apply (shape and budget flags are ignored)",
            args.out.display()
        );
        RunDir::open_writer(&args.out)?
    } else {
        RunDir::create(&args.out, args.manifest()?)?
    };
    let parts: Vec<usize> = match args.block {
        None => (0..run.manifest.parts.len()).collect(),
        Some(b)
            if run.manifest.family.is_blocks() && (1..=run.manifest.parts.len()).contains(&b) =>
        {
            vec![b - 1]
        }
        Some(b) => bail!(
            "--block {b} needs --objective block or edm and 1 <= b <= {}",
            run.manifest.parts.len()
        ),
    };
    let data = run.manifest.plan.dataset.load(Split::Train)?;
    eprintln!(
        "training on {} (train split, {} bytes) on {device:?}",
        run.manifest.plan.dataset.describe(),
        data.len()
    );
    for part in parts {
        train_part(&mut run, part, &data, device, args.save_every)?;
    }
    print_budget(&run.manifest);
    println!("checkpoint: {}", args.out.display());
    Ok(())
}

/// Trains one part to the plan's step count, saving every `save_every` steps.
pub fn train_part(
    run: &mut RunDir,
    part: usize,
    data: &[u8],
    device: Device,
    save_every: i64,
) -> Result<()> {
    let (total, batch, seed, window) = (
        run.manifest.plan.steps,
        run.manifest.plan.batch,
        run.manifest.plan.seed,
        run.manifest.model.window,
    );
    let name = run.manifest.parts[part].name.clone();
    let mut trainer = run
        .trainer(part, device)
        .with_context(|| format!("loading {name}"))?;
    let done = trainer.steps();
    if done >= total {
        eprintln!("{name}: already trained ({done}/{total} steps)");
        return Ok(());
    }
    // Every part reads the same windows in the same order (fair comparison).
    let mut sampler = WindowSampler::new(data, window, seed, device)?;
    sampler.skip(done as u64, batch);
    let pb = progress::bar(total as u64, &name);
    pb.set_position(done as u64);
    let log_every = 25.min(total).max(1);
    let mut acc = Tensor::zeros([], (Kind::Float, device));
    let mut since_log = 0;
    let mut last_loss = None;
    let mut since_save = Instant::now();
    for step in done..total {
        acc += trainer.train_step(&sampler.next_batch(batch), total);
        since_log += 1;
        let end = step + 1 == total;
        if (step + 1) % log_every == 0 || end {
            let mean = acc.double_value(&[]) / since_log as f64;
            since_log = 0;
            if !mean.is_finite() {
                bail!("{name} diverged at step {} (loss {mean}); nothing saved past the last checkpoint; lower --lr", step + 1);
            }
            acc = Tensor::zeros([], (Kind::Float, device));
            last_loss = Some(mean);
            pb.set_message(format!("loss {mean:.4}"));
        }
        pb.inc(1);
        if pb.is_hidden() && ((step + 1) % (total / 20).max(1) == 0 || end) {
            // Not a terminal (a log file, CI): plain lines instead of a bar.
            eprintln!(
                "{name}: step {}/{total}, loss {:.4}",
                step + 1,
                last_loss.unwrap_or(f64::NAN)
            );
        }
        if (step + 1) % save_every == 0 || end {
            run.save(
                part,
                &trainer,
                last_loss,
                since_save.elapsed().as_secs_f64(),
            )?;
            since_save = Instant::now();
        }
    }
    pb.finish();
    eprintln!(
        "{name}: {total} steps, last loss {:.4} nats/byte (training estimate)",
        last_loss.unwrap_or(f64::NAN)
    );
    Ok(())
}

/// Prints the training budget (bytes and FLOPs per part).
pub fn print_budget(m: &Manifest) {
    let tokens = (m.plan.steps * m.plan.batch * m.model.window) as f64;
    let total: f64 = (0..m.parts.len())
        .map(|p| flops::train_flops_per_token(&m.part_model(p)) * tokens)
        .sum();
    eprintln!(
        "budget: {} part(s) x {} steps x {} windows x {} bytes = {:.2} MB each; {:.3} TFLOP total",
        m.parts.len(),
        m.plan.steps,
        m.plan.batch,
        m.model.window,
        tokens / 1e6,
        total / 1e12
    );
}
