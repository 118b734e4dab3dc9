//! `blocktrain bench attacks`: how often each kind of cheating worker is caught at the
//! shipped trust defaults (`RunConfig::default()`: screen 32 windows at 0.05 nats/byte,
//! spot checks on 5% of leases, fp16 updates), measured over seeded runs.
//!
//! Every trial is its own run: a fresh coordinator state (run seed and coordinator key
//! derived from the bench seed and the trial) whose block `trial % B` trains
//! `--warm-rounds` honest rounds with honest in-process workers, then copied once per
//! attacker so each
//! attacker faces the same state, the same lease, the same honest delta and the same
//! spot-check draw (a paired design: differences between rows are the attackers'
//! own). The attacker takes a real lease with a fresh key (a flag would otherwise end
//! the measurement), trains the honest delta with `train_delta` exactly as a worker
//! does (served checkpoint decoded, the lease's shard), tampers with it, encodes it in
//! the run's codec and uploads it with a signed claim through `submit_update`.
//!
//! Besides the coordinator's verdict, each upload records what the bench can see
//! because it holds the coordinator's key: whether the lease was in the spot-check
//! sample, whether a recomputation would have flagged it (the recomputation is the
//! honest delta: same inputs, same code), and its change on the secret screen
//! (rebuilt from the key, checked against the coordinator's own loss). Those give the
//! detection probability at other spot-check fractions without rerunning, and the
//! screen's margins.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use blocktrain_model::data::Split;
use blocktrain_protocol::codec::Codec;
use blocktrain_train::config::RunConfig;
use clap::{Args, ValueEnum};

use crate::cmd::bench_attacks_report::{report, Upload};
use crate::cmd::bench_attacks_trial::Bench;
use crate::profile::Profile;

/// Flags of `blocktrain bench attacks`.
#[derive(Args, Debug)]
pub struct BenchAttacksArgs {
    /// Seeded runs; each attacker uploads once per run.
    #[arg(long, default_value_t = 40)]
    pub trials: usize,
    /// Block shape (the only setting changed from `RunConfig::default()`); demo and
    /// quality share one block shape, the run's default.
    #[arg(long, value_enum, default_value = "tiny")]
    pub profile: Profile,
    /// Honest rounds the attacked block trains before the attack (0: attack the initial
    /// weights; the shipped run has 6).
    #[arg(long, default_value_t = 3)]
    pub warm_rounds: u64,
    /// Attackers, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "honest,flip,noise,x3,other-data,tuned,zero"
    )]
    pub attackers: Vec<Attacker>,
    /// Seeds every run, coordinator key and worker key of the bench.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate another `[trust] spot_check_fraction` (default: the shipped one).
    #[arg(long)]
    pub spot_check_fraction: Option<f64>,
    /// Evaluate another `[trust] screen_threshold` (default: the shipped one).
    #[arg(long)]
    pub screen_threshold: Option<f64>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-attacks.json")]
    pub json: PathBuf,
    /// Intra-op CPU threads. One by default: these shapes gain nothing from more, and
    /// spinning threads on a shared 2-core machine made training 20x slower.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// What a worker uploads instead of its honest delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Attacker {
    /// The honest delta (the baseline: false positives of screen and spot check).
    Honest,
    /// -delta.
    Flip,
    /// Gaussian noise with each tensor's RMS.
    Noise,
    /// 3 x delta.
    X3,
    /// Honest training on the valid split (public, and the screen's source) instead
    /// of the lease's shard.
    OtherData,
    /// A flip scaled down until the worker's own proxy screen (the public test split,
    /// its own masks) rises by less than the configured threshold.
    Tuned,
    /// All zeros: credit for no work.
    Zero,
}

impl Attacker {
    /// The name on the command line and in the table.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// Runs the benchmark.
pub fn run(args: BenchAttacksArgs) -> Result<()> {
    if args.trials == 0 || args.attackers.is_empty() {
        bail!("--trials and --attackers must not be empty");
    }
    if args.profile == Profile::Judge {
        bail!("the judge profile is an AR network, not a block a run trains: use tiny or demo");
    }
    blocktrain_model::device::pin_threads(Some(args.threads));
    let mut cfg = RunConfig {
        model: args.profile.preset().block,
        ..Default::default()
    };
    if let Some(f) = args.spot_check_fraction {
        cfg.trust.spot_check_fraction = f;
    }
    if let Some(t) = args.screen_threshold {
        cfg.trust.screen_threshold = t;
    }
    cfg.validate()?;
    let manifest = cfg.manifest()?;
    let dataset = manifest.plan.dataset.clone();
    let root =
        std::env::temp_dir().join(format!("blocktrain-bench-attacks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let bench = Bench {
        codec: Codec::parse(&cfg.wire.codec)?,
        train: dataset.load(Split::Train)?,
        valid: dataset.load(Split::Valid)?,
        test: dataset.load(Split::Test)?,
        manifest,
        cfg,
        seed: args.seed,
        warm_rounds: args.warm_rounds,
        root: root.clone(),
    };
    eprintln!(
        "bench attacks: {} trials x {} attackers, {:?} blocks (d {}, {} layer(s), window {}), {} warm rounds, {}",
        args.trials,
        args.attackers.len(),
        args.profile,
        bench.cfg.model.d_model,
        bench.cfg.model.n_layers,
        bench.cfg.model.window,
        args.warm_rounds,
        dataset.describe()
    );
    let t0 = Instant::now();
    // The scratch runs go whether the trials finish or fail.
    let trials = run_trials(&bench, &args, t0);
    let _ = std::fs::remove_dir_all(&root);
    let (uploads, warm_refused) = trials?;
    let doc = report(
        &args,
        &bench.cfg,
        &uploads,
        warm_refused,
        t0.elapsed().as_secs_f64(),
    );
    std::fs::write(&args.json, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    eprintln!("wrote {}", args.json.display());
    Ok(())
}

/// Every trial in turn, each attacker once per trial: the uploads and the honest
/// warm-up uploads refused.
fn run_trials(bench: &Bench, args: &BenchAttacksArgs, t0: Instant) -> Result<(Vec<Upload>, usize)> {
    let mut uploads = Vec::new();
    let mut warm_refused = 0;
    for i in 0..args.trials {
        let mut trial = bench
            .warm(i)
            .with_context(|| format!("warming trial {i}"))?;
        for &a in &args.attackers {
            let up = bench
                .attack(&mut trial, a)
                .with_context(|| format!("trial {i}, attacker {}", a.name()))?;
            uploads.push(up);
        }
        warm_refused += trial.warm_refused;
        let _ = std::fs::remove_dir_all(&trial.dir);
        eprint!(
            "\r{}/{} trials, {:.0} s",
            i + 1,
            args.trials,
            t0.elapsed().as_secs_f64()
        );
    }
    eprintln!();
    Ok((uploads, warm_refused))
}
