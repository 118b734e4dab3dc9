//! `blocktrain coordinator`: serves one run until it is done (with `--exit-when-done`)
//! or Ctrl-C. State lives in `--state DIR`: kill it at any moment and start it again
//! with the same `--state`, and training continues from the last committed versions.
//!
//! Off loopback it refuses to serve a run anyone may join (no join secret, no
//! allowlist) unless `--open-registration` says that is meant, and warns when it serves
//! plain HTTP there. `--tls-cert/--tls-key` or `--tls-self-signed` serve HTTPS.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use blocktrain_train::config::{AuthConfig, RunConfig};
use blocktrain_train::coordinator::Coordinator;
use blocktrain_train::tls::ServerTls;
use blocktrain_train::{now_ms, server};
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
    /// Serve HTTPS with this certificate chain (PEM, leaf first; needs --tls-key).
    #[arg(long, requires = "tls_key", conflicts_with = "tls_self_signed")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve HTTPS with a self-signed certificate kept in STATE/tls-cert.pem and
    /// STATE/tls-key.pem: made on the first start, reused after it so that workers'
    /// pins keep working. Its fingerprint is printed; workers pass it as
    /// --tls-fingerprint.
    #[arg(long)]
    pub tls_self_signed: bool,
    /// Serve off loopback a run that any worker key may join (no [auth] join_secret or
    /// allow list). Without it the coordinator refuses to start such a run.
    #[arg(long)]
    pub open_registration: bool,
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

/// Whether any worker key may join.
fn is_open(auth: &AuthConfig) -> bool {
    auth.join_secret.as_deref().is_none_or(str::is_empty)
        && auth.allow.is_empty()
        && auth.invites.is_empty()
}

/// The start-up exposure check: off loopback, an open run needs --open-registration
/// (error otherwise), and plain HTTP is worth a warning (returned).
fn exposure(args: &CoordinatorArgs, auth: &AuthConfig) -> Result<Vec<String>> {
    let listen = args.listen;
    if listen.ip().is_loopback() {
        return Ok(vec![]);
    }
    if is_open(auth) && !args.open_registration {
        bail!(
            "refusing to serve on {listen}: this run has neither an [auth] join_secret nor an \
             [auth] allow list, so anyone who can reach it could join and send updates. Set \
             join_secret = \"...\" (workers pass --join-secret) or allow = [\"<worker key>\"] \
             in run.toml, or pass --open-registration if an open run is what you want"
        );
    }
    let tls = args.tls_self_signed || args.tls_cert.is_some();
    Ok(if tls {
        vec![]
    } else {
        vec![format!(
            "serving plain HTTP on {listen}: requests are signed but not encrypted, so \
             updates and checkpoints can be read on the way; serve HTTPS with \
             --tls-cert/--tls-key or --tls-self-signed"
        )]
    })
}

/// The TLS set-up the flags ask for, if any.
fn server_tls(args: &CoordinatorArgs) -> Result<Option<ServerTls>> {
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        return Ok(Some(ServerTls::from_pem_files(cert, key)?));
    }
    if !args.tls_self_signed {
        return Ok(None);
    }
    // Names matter little (workers pin the fingerprint), but some clients want one.
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if !args.listen.ip().is_unspecified() && !args.listen.ip().is_loopback() {
        names.push(args.listen.ip().to_string());
    }
    let (tls, kept) = ServerTls::self_signed_in(&args.state, &names)?;
    let what = if kept.created {
        "made a new"
    } else {
        "using the"
    };
    println!(
        "{what} self-signed TLS certificate {} (key {})",
        kept.cert.display(),
        kept.key.display()
    );
    Ok(Some(tls))
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
    // Check before opening a new run's state too, so a refused start leaves nothing.
    if let Some(c) = &cfg {
        exposure(&args, &c.auth)?;
    }
    let coord = Coordinator::open(&args.state, cfg, now_ms())?;
    let c = coord.config().clone();
    let warnings = exposure(&args, &c.auth)?;
    let tls = server_tls(&args)?;
    let running = server::spawn_with(args.listen, coord, tls)?;
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
    if let Some(f) = running.fingerprint() {
        println!("TLS certificate SHA-256 fingerprint {f} (workers of a self-signed coordinator: --tls-fingerprint {f})");
    }
    if is_open(&c.auth) {
        println!("note: this run is open to any worker key (set [auth] join_secret or allow in run.toml to restrict it)");
    }
    for w in warnings {
        println!("warning: {w}");
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
