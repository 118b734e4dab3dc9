//! `blocktrain demo`: the README's first command. The whole system on loopback: a
//! coordinator and several worker processes train every block on the shipped
//! WikiText-2 (real checkpoints and updates over HTTP, bytes counted), then the merged
//! model is evaluated on held-out valid windows and a sample is printed.
//! Running it again resumes (or reuses) the run in `--out`.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blocktrain_model::config::EdmConfig;
use blocktrain_model::data::Split;
use blocktrain_model::run::RunDir;
use blocktrain_protocol::frame::{BlockRange, Sampling};
use blocktrain_serve::client;
use blocktrain_serve::hop::HopLimits;
use blocktrain_serve::hosted::{Hosted, Source};
use blocktrain_serve::server::{self as block_server, ServeOptions};
use blocktrain_train::config::{ObjectiveFamily, RunConfig};
use blocktrain_train::coordinator::{Coordinator, Status};
use blocktrain_train::{now_ms, server};
use clap::{Args, ValueEnum};

use crate::args::DeviceArgs;
use crate::cmd::eval;
use crate::profile::Profile;
use crate::progress;

/// Flags of `blocktrain demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size preset (tiny takes seconds, demo a few minutes on 2 cores).
    #[arg(long, value_enum, default_value = "demo")]
    pub profile: Profile,
    /// Objective family: masked (ours) or edm (the BlockTrain paper's embedding
    /// diffusion, with the default [edm] settings of run.toml).
    #[arg(long, value_enum, default_value = "masked")]
    pub objective: FamilyArg,
    /// Number of blocks.
    #[arg(long, default_value_t = 3)]
    pub blocks: usize,
    /// Worker processes (several per block when more than --blocks; their updates are
    /// averaged by the outer optimizer).
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    /// Local steps per round (H).
    #[arg(long)]
    pub local_steps: Option<i64>,
    /// Update codec: fp32, fp16, int8[:chunk], topk:fraction.
    #[arg(long, default_value = "fp16")]
    pub codec: String,
    /// Run directory (coordinator state; the merged model is in OUT/model); default
    /// runs/demo, or runs/demo-edm with --objective edm.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Training data: wikitext2, shakespeare, or a file path.
    #[arg(long, default_value = "wikitext2")]
    pub data: String,
    /// Prompt of the printed sample.
    #[arg(long, default_value = " = The ")]
    pub prompt: String,
    /// Bytes in the printed sample.
    #[arg(long, default_value_t = 96)]
    pub len: usize,
    /// Seed of weights, data order, masks and sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// The objective family on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FamilyArg {
    /// Masked byte diffusion.
    Masked,
    /// Embedding diffusion with EDM.
    Edm,
}

impl DemoArgs {
    /// Where the run lives.
    pub fn out(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| match self.objective {
            FamilyArg::Masked => PathBuf::from("runs/demo"),
            FamilyArg::Edm => PathBuf::from("runs/demo-edm"),
        })
    }

    /// The run: the profile's model and budget, with each block's total local steps
    /// (over all its workers) equal to the profile's steps per part.
    pub fn run_config(&self) -> Result<RunConfig> {
        let p = self.profile.preset();
        let per_block = self.workers.div_ceil(self.blocks).max(1) as u32;
        let h = self
            .local_steps
            .unwrap_or(if self.profile == Profile::Tiny { 5 } else { 50 });
        let objective = match self.objective {
            FamilyArg::Masked => ObjectiveFamily::Masked,
            FamilyArg::Edm => ObjectiveFamily::Edm,
        };
        let mut cfg = RunConfig {
            blocks: self.blocks,
            objective,
            edm: EdmConfig {
                embed_seed: self.seed,
                ..EdmConfig::default()
            },
            dataset: self.data.clone(),
            seed: self.seed,
            model: p.block,
            optim: p.optim,
            ..Default::default()
        };
        cfg.training.local_steps = h;
        cfg.training.batch = p.batch;
        cfg.training.workers_per_block = per_block;
        cfg.training.rounds = (p.steps / (h * per_block as i64)).max(1) as u64;
        cfg.wire.codec = self.codec.clone();
        cfg.faults.lease_secs = 60.0;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The command line of local worker `k` (1-based) against `url`, files under `dir`.
pub fn worker_command(
    prefix: &[String],
    url: &str,
    dir: &Path,
    k: usize,
    device: &DeviceArgs,
    threads: usize,
) -> Result<Command> {
    let exe = std::env::current_exe().context("locating the blocktrain binary")?;
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.arg("worker")
        .args(["--coordinator", url])
        .arg("--key")
        .arg(dir.join(format!("worker-{k}.key")))
        .arg("--cache")
        .arg(dir.join(format!("cache-{k}")))
        .args([
            "--device",
            &device.device,
            "--threads",
            &threads.to_string(),
        ])
        .args(["--retry-for", "30"])
        .stdin(Stdio::null());
    let log = std::fs::File::create(dir.join(format!("worker-{k}.log")))?;
    cmd.stdout(log.try_clone()?).stderr(log);
    Ok(cmd)
}

/// CPU threads per worker when `n` share this machine.
pub fn threads_per_worker(n: usize, device: &DeviceArgs) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    device.threads.unwrap_or((cores / n.max(1)).max(1))
}

/// Starts `n` worker processes of this binary against `url`; logs go to `dir`.
pub fn spawn_workers(n: usize, url: &str, dir: &Path, device: &DeviceArgs) -> Result<Vec<Child>> {
    std::fs::create_dir_all(dir)?;
    let threads = threads_per_worker(n, device);
    (1..=n)
        .map(|k| {
            worker_command(&[], url, dir, k, device, threads)?
                .spawn()
                .context("starting a worker process")
        })
        .collect()
}

/// Serves the run in `out` to `workers` local worker processes until every block has
/// all its versions, with a progress bar; returns the final status.
pub fn train_on_loopback(
    cfg: RunConfig,
    out: &Path,
    workers: usize,
    device: &DeviceArgs,
) -> Result<Status> {
    let logs = out.join("workers");
    serve_until_done(cfg, out, |url| spawn_workers(workers, url, &logs, device))
}

/// Serves the run in `out` on loopback, starts workers with `start(url)`, and shows
/// progress until every block has all its versions; returns the final status.
pub fn serve_until_done(
    cfg: RunConfig,
    out: &Path,
    start: impl FnOnce(&str) -> Result<Vec<Child>>,
) -> Result<Status> {
    let coord = Coordinator::open(out, Some(cfg.clone()), now_ms())
        .map_err(|e| anyhow::anyhow!("{e} (or pass --out to start a new run elsewhere)"))?;
    let running = server::spawn("127.0.0.1:0".parse()?, coord)?;
    let total = (cfg.blocks as u64) * cfg.training.rounds;
    let bar = progress::bar(total, "versions");
    let logs = out.join("workers");
    let mut children = if running.status()?.done {
        Vec::new()
    } else {
        start(&running.url())?
    };
    let start = Instant::now();
    loop {
        let s = running.status()?;
        bar.set_position(s.blocks.iter().map(|b| b.version).sum());
        bar.set_message(format!(
            "{} workers, {:.1} MB up / {:.1} MB down, {} rejected",
            s.workers.len(),
            s.bytes_up as f64 / 1e6,
            s.bytes_down as f64 / 1e6,
            s.updates.get("rejected").copied().unwrap_or(0)
        ));
        if s.done {
            break;
        }
        let mut alive = 0;
        for c in children.iter_mut() {
            if c.try_wait()?.is_none() {
                alive += 1;
            }
        }
        if alive == 0 {
            bar.abandon();
            bail!(
                "every worker exited before the run finished; see their logs in {}",
                logs.display()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    bar.finish();
    // Workers hear "done" on their next request; give them a moment, then make sure.
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in children.iter_mut() {
        while c.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    let s = running.status()?;
    running.stop()?;
    println!(
        "trained in {:.0} s: {} updates merged, {} rejected; {:.2} MB uploaded, {:.2} MB downloaded (worker logs in {})",
        start.elapsed().as_secs_f64(),
        s.updates.get("applied").copied().unwrap_or(0),
        s.updates.get("rejected").copied().unwrap_or(0),
        s.bytes_up as f64 / 1e6,
        s.bytes_down as f64 / 1e6,
        logs.display()
    );
    Ok(s)
}

/// Serves each block from its own in-process block server on loopback and generates
/// across them: the same frames and hops as servers on separate hosts.
fn sample_over_servers(
    model: &Path,
    args: &DemoArgs,
    device: tch::Device,
) -> Result<(client::Generation, String)> {
    let mut route = Vec::new();
    for b in 1..=args.blocks as u32 {
        let blocks = BlockRange::new(b, b)?;
        let hosted = Hosted::load(Source::Checkpoint(model), blocks, device, 4096)?;
        let addr = block_server::spawn("127.0.0.1:0".parse()?, hosted, ServeOptions::default())?;
        route.push(addr.to_string());
    }
    let request = client::Request {
        prompt: args.prompt.as_bytes().to_vec(),
        len: args.len,
        sampling: Sampling {
            steps_per_block: blocktrain_model::sampler::DEFAULT_STEPS_PER_BLOCK as u32,
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
            heun: false,
        },
        seed: args.seed,
    };
    let limits = HopLimits::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(async {
        let plan = client::discover(&route, &limits).await?;
        client::generate(&plan, &request, &limits).await
    })?;
    let hops = out
        .hops
        .iter()
        .map(|h| format!("block {} {:.0} ms", h.blocks.first, h.compute_ms))
        .collect::<Vec<_>>()
        .join(", ");
    Ok((out, hops))
}

/// Runs `blocktrain demo`.
pub fn run(args: DemoArgs) -> Result<()> {
    crate::cmd::coordinator::init_logging_quiet();
    let device = args.device.setup()?;
    let cfg = args.run_config()?;
    println!(
        "== 1/3 train {} blocks on loopback: a coordinator and {} worker processes, {} rounds x {} local steps per block, {} updates ({:?} profile)",
        args.blocks, args.workers, cfg.training.rounds, cfg.training.local_steps, cfg.wire.codec, args.profile
    );
    let out = args.out();
    train_on_loopback(cfg, &out, args.workers, &args.device)?;

    let model = out.join("model");
    let run = RunDir::open(&model)?;
    println!("== 2/3 evaluate the merged model on held-out data");
    let windows = args.profile.preset().eval_windows;
    let report = eval::evaluate(&run, Split::Valid, 1, windows, 64, 1234, device)?;
    eval::print_report(&run, Split::Valid, &report);

    println!(
        "== 3/3 sample: one traversal of {} block servers on loopback (blocks {}..1)",
        args.blocks, args.blocks
    );
    let (out, hops) = sample_over_servers(&model, &args, device)?;
    println!("{}{}", args.prompt, String::from_utf8_lossy(&out.output));
    println!(
        "({} bytes in {:.2} s; {hops}; `blocktrain serve` puts each block on its own host)",
        out.output.len(),
        out.seconds
    );
    println!(
        "\nmerged model: {} (try `blocktrain eval --checkpoint {}`)",
        model.display(),
        model.display()
    );
    Ok(())
}
