//! `blocktrain coordinator`: serves one run until it is done (with `--exit-when-done`)
//! or Ctrl-C. State lives in `--state DIR`: kill it at any moment and start it again
//! with the same `--state`, and training continues from the last committed versions.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use blocktrain_node::config::RunConfig;
use blocktrain_node::coordinator::Coordinator;
use blocktrain_node::{now_ms, server};
use clap::Args;

/// Flags of `blocktrain coordinator`.
#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// Address to serve on (port 0 picks a free port; the chosen address is printed and
    /// written to STATE/coordinator.addr).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Run settings (TOML; every field optional, see --print-config). Needed to start a
    /// run; omit it to resume the run already in --state.
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Durable state: SQLite database, checkpoints, and the exported model in STATE/model.
    #[arg(long, default_value = "runs/coordinator")]
    pub state: PathBuf,
    /// Exit once every block has all its versions (after workers have been told).
    #[arg(long)]
    pub exit_when_done: bool,
    /// Print the full default run.toml and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Logs at info level unless RUST_LOG says otherwise.
pub fn init_logging() {
    init_logging_at("info");
}

/// Warnings only unless RUST_LOG says otherwise (when a progress bar shows progress).
pub fn init_logging_quiet() {
    init_logging_at("warn");
}

fn init_logging_at(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs `blocktrain coordinator`.
pub fn run(args: CoordinatorArgs) -> Result<()> {
    if args.print_config {
        print!("{}", RunConfig::default().to_toml());
        return Ok(());
    }
    init_logging();
    let cfg = match &args.run {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Some(RunConfig::from_toml(&text)?)
        }
        None => None,
    };
    let coord = Coordinator::open(&args.state, cfg, now_ms())?;
    let c = coord.config().clone();
    let running = server::spawn(args.listen, coord)?;
    std::fs::write(
        args.state.join("coordinator.addr"),
        running.addr.to_string(),
    )?;
    println!(
        "coordinator on {} : {} blocks x {} rounds of {} local steps, up to {} workers per block, codec {}, outer {:?}; state in {}",
        running.url(),
        c.blocks,
        c.training.rounds,
        c.training.local_steps,
        c.training.workers_per_block,
        c.wire.codec,
        c.outer.optimizer,
        args.state.display()
    );
    if c.auth.join_secret.is_none() && c.auth.allow.is_empty() {
        println!("note: this run is open to any worker key (set [auth] join_secret or allow in run.toml to restrict it)");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut done_since: Option<std::time::Instant> = None;
    let grace = Duration::from_secs_f64((c.faults.lease_secs / 3.0 + 2.0).clamp(3.0, 30.0));
    loop {
        let ctrl_c = rt.block_on(async {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => true,
                _ = tokio::time::sleep(Duration::from_millis(500)) => false,
            }
        });
        if ctrl_c {
            println!(
                "stopping (state is saved; start again with --state {} to continue)",
                args.state.display()
            );
            break;
        }
        if args.exit_when_done {
            let done = running.status()?.done;
            match (done, done_since) {
                (true, None) => done_since = Some(std::time::Instant::now()),
                // Give polling workers time to hear that the run is done: a worker still
                // on a superseded lease learns it at its next heartbeat (lease / 3).
                (true, Some(t)) if t.elapsed() > grace => break,
                _ => {}
            }
        }
    }
    let status = running.status()?;
    running.stop()?;
    println!(
        "blocks at versions {:?}; {:.2} MB up, {:.2} MB down; model in {}",
        status.blocks.iter().map(|b| b.version).collect::<Vec<_>>(),
        status.bytes_up as f64 / 1e6,
        status.bytes_down as f64 / 1e6,
        args.state.join("model").display()
    );
    Ok(())
}
