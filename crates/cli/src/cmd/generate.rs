//! `blocktrain generate`: one pass through the block stack (diffusion) or byte-by-byte
//! sampling (AR reference).
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use blocktrain_model::run::{Family, RunDir};
use blocktrain_model::sampler::{self, SampleSettings};
use clap::Args;

use crate::args::DeviceArgs;

/// Flags of `blocktrain generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Run directory written by `blocktrain train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Prompt bytes (kept unmasked; the output follows them).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Output bytes to generate.
    #[arg(long, default_value_t = 128)]
    pub len: usize,
    /// Denoising steps each block takes over its interval.
    #[arg(long, default_value_t = 32)]
    pub steps_per_block: usize,
    /// Softmax temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Sample only from the k most likely bytes (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Generates from an opened run.
pub fn sample(run: &RunDir, args: &GenerateArgs, device: tch::Device) -> Result<Vec<u8>> {
    if args.len == 0 {
        bail!("--len must be at least 1");
    }
    if args.temperature <= 0.0 {
        bail!("--temperature must be positive");
    }
    let m = &run.manifest;
    let total = args.prompt.len() + args.len;
    if total as i64 > m.model.window {
        eprintln!(
            "note: prompt + len = {total} bytes exceeds the trained window of {}; quality may drop",
            m.model.window
        );
    }
    let settings = SampleSettings {
        steps_per_block: args.steps_per_block,
        temperature: args.temperature,
        top_k: args.top_k,
    };
    let trainers = (0..m.parts.len())
        .map(|p| run.trained(p, device))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(if m.family == Family::Ar {
        sampler::generate_ar(
            &trainers[0].net,
            args.prompt.as_bytes(),
            args.len,
            &settings,
            args.seed,
            device,
        )
    } else {
        let nets: Vec<_> = (0..m.schedule.blocks())
            .map(|i| &trainers[m.part_for_interval(i)].net)
            .collect();
        sampler::generate(
            &nets,
            &m.schedule,
            args.prompt.as_bytes(),
            args.len,
            &settings,
            args.seed,
            device,
        )
    })
}

/// Runs `blocktrain generate`: prints prompt + output (invalid UTF-8 shown lossily).
pub fn run(args: GenerateArgs) -> Result<()> {
    let device = args.device.setup()?;
    let run = RunDir::open(&args.checkpoint)?;
    let out = sample(&run, &args, device)?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}{}", args.prompt, String::from_utf8_lossy(&out))?;
    Ok(())
}
