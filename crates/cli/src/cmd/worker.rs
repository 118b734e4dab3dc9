//! `blocktrain worker`: joins a run and trains whatever block the coordinator assigns
//! until the run is done. Ctrl-C (or SIGTERM) stops it after the current training step
//! and audits the ledger before it exits; a second one exits at once.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use blocktrain_train::tls::TlsTrust;
use blocktrain_train::worker::{Control, WorkerOptions};
use clap::Args;

use crate::args::DeviceArgs;

/// Flags of `blocktrain worker`.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Coordinator URL.
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    pub coordinator: String,
    /// This worker's ed25519 key file (created on first run, mode 0600).
    #[arg(long, default_value = "worker.key")]
    pub key: PathBuf,
    /// Train on this file's bytes instead of the run's corpus. The bytes never leave
    /// this host; the coordinator records only their blake3 and size.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Cache directory (default: `cache/` beside the key file). Each worker key keeps
    /// its own `<first 16 hex digits of its public key>/` in it: checkpoints, the
    /// coordinator's pinned key, the last ledger head checked, and its upload journal.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// The run's join secret, if it has one.
    #[arg(long, env = "BLOCKTRAIN_JOIN_SECRET")]
    pub join_secret: Option<String>,
    /// Stop after this many leases (default: until the run is done).
    #[arg(long)]
    pub max_leases: Option<usize>,
    /// Trust an https:// coordinator's certificate only if its SHA-256 fingerprint is
    /// this (64 hex digits, colons allowed): for a self-signed coordinator, which
    /// prints it at start-up (`blocktrain doctor --coordinator URL` shows it too).
    #[arg(long, env = "BLOCKTRAIN_TLS_FINGERPRINT", conflicts_with = "tls_ca")]
    pub tls_fingerprint: Option<String>,
    /// Trust an https:// coordinator's certificate only if this CA (PEM) issued it,
    /// instead of the public CA roots.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Seconds to keep retrying an unreachable coordinator before giving up.
    #[arg(long, default_value_t = 600)]
    pub retry_for: u64,
    /// Testing the coordinator's defences only: tamper with every update (flip,
    /// scale:K, random) as a malicious worker would.
    #[arg(long, hide = true)]
    pub malice: Option<blocktrain_train::worker::Malice>,
    /// Measuring participation only: miss this share of rounds (stay away, training
    /// nothing, for as long as the last lease took), in [0, 1).
    #[arg(long, hide = true, default_value_t = 0.0)]
    pub miss: f64,
    /// Measuring participation only: run at 1/F of this host's speed (sleep between steps).
    #[arg(long, hide = true, default_value_t = 1.0)]
    pub slowdown: f64,
    /// Measuring participation only: seed the missed-round draws with this instead of the
    /// worker's key, so runs compared side by side miss the same leases.
    #[arg(long, hide = true)]
    pub participation_seed: Option<u64>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `blocktrain worker`.
pub fn run(args: WorkerArgs) -> Result<()> {
    let tls = TlsTrust::from_flags(args.tls_fingerprint.as_deref(), args.tls_ca.as_deref())?;
    let device = args.device.setup()?;
    let cache = args.cache.clone().unwrap_or_else(|| {
        args.key
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| p.join("cache"))
            .unwrap_or_else(|| PathBuf::from("cache"))
    });
    let ctl = Control {
        participation: blocktrain_train::worker::Participation {
            miss: args.miss,
            slowdown: args.slowdown,
            seed: args.participation_seed,
        },
        ..Control::default()
    };
    stop_on_signals(ctl.stop.clone());
    let summary = ctl.run(&WorkerOptions {
        coordinator: args.coordinator.clone(),
        key: args.key.clone(),
        data: args.data.clone(),
        cache,
        device,
        join_secret: args.join_secret.clone(),
        max_leases: args.max_leases,
        retry_for: Duration::from_secs(args.retry_for),
        malice: args.malice,
        tls,
    })?;
    let how = match ctl.stop.load(Ordering::Relaxed) {
        true => "stopped",
        false => "finished",
    };
    println!(
        "worker {how}: {} updates accepted, {} refused, {} local steps, {:.2} MB up, {:.2} MB down",
        summary.accepted,
        summary.refused,
        summary.steps,
        summary.bytes_up as f64 / 1e6,
        summary.bytes_down as f64 / 1e6
    );
    Ok(())
}

/// Sets `stop` on the first Ctrl-C or SIGTERM, so the worker audits the ledger on its
/// way out; exits at once on the second (a stuck request can take minutes to time out).
fn stop_on_signals(stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            eprintln!("no signal handling: Ctrl-C exits without the ledger audit");
            return;
        };
        rt.block_on(async {
            #[cfg(unix)]
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            loop {
                #[cfg(unix)]
                let terminated = async {
                    match term.as_mut() {
                        Some(t) => t.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let terminated = std::future::pending::<Option<()>>();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminated => {}
                }
                if stop.swap(true, Ordering::Relaxed) {
                    eprintln!("stopping now, without the ledger audit");
                    std::process::exit(130);
                }
                eprintln!(
                    "stopping after the current step, then auditing the ledger \
                     (again to exit at once)"
                );
            }
        });
    });
}
