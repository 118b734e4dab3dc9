//! `blocktrain serve`: a block server hosting some blocks of a trained run (or of a
//! random logical shape), reached by clients and other servers over TCP.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use blocktrain_model::logical::LogicalShape;
use blocktrain_protocol::frame::{self, BlockRange};
use blocktrain_serve::framed::FrameDeadline;
use blocktrain_serve::hop::{Credentials, HopLimits};
use blocktrain_serve::hosted::{Hosted, Source};
use blocktrain_serve::server::{
    serve, BatchOptions, Caps, ClientAuth, ServeOptions, MAX_BATCH_LIMIT,
};
use clap::Args;

use crate::args::DeviceArgs;

/// Flags of `blocktrain serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Run directory to serve (a `train` run, or a coordinator's STATE/model).
    #[arg(long, required_unless_present = "logical_shape")]
    pub checkpoint: Option<PathBuf>,
    /// Blocks to host, 1-based and inclusive: `3..4` is blocks 3 and 4, `2` is block 2.
    /// For an AR checkpoint (the baseline) these are its layers.
    #[arg(long)]
    pub blocks: BlockRange,
    /// Address to listen on (port 0 picks one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:7100")]
    pub listen: SocketAddr,
    /// Name in hop reports and logs (default: the listen address).
    #[arg(long)]
    pub name: Option<String>,
    /// Instead of a checkpoint: random weights of this shape per block, e.g.
    /// `d=4096,layers=8,heads=32,dtype=bf16` (for measuring serving cost at scale).
    #[arg(long, conflicts_with = "checkpoint")]
    pub logical_shape: Option<LogicalShape>,
    /// With --logical-shape: blocks (or AR layers) in the whole logical model.
    #[arg(long, default_value_t = 3)]
    pub total: u32,
    /// With --logical-shape: serve AR layers (the baseline) instead of diffusion blocks.
    #[arg(long)]
    pub ar: bool,
    /// With --logical-shape: seed of the random weights (all servers of a route must agree).
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// With --logical-shape (diffusion): layer applications of each block of --total, e.g.
    /// `31,32,32` for 95 over 3 blocks (overrides the shape's `layers` per block; every
    /// server of a route must give the same list, it is part of the model id).
    #[arg(long, value_delimiter = ',', requires = "logical_shape")]
    pub block_layers: Option<Vec<u32>>,
    /// Longest prompt + output accepted, in tokens.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: u32,
    /// Largest frame accepted, MiB.
    #[arg(long, default_value_t = 16)]
    pub max_frame_mb: u32,
    /// Seconds of silence after which the next stage's replica is given up on.
    #[arg(long, default_value_t = 10.0)]
    pub stall_timeout: f64,
    /// Seconds the next stage's replica may take for its final answer, keepalives or not,
    /// per stage from it to the end of the route (a replica that only sends keepalives
    /// is given up on like a stalled one, and the next replica tried).
    #[arg(long, default_value_t = 300.0)]
    pub hop_deadline_s: f64,
    /// Seconds to wait for a TCP connection to the next stage.
    #[arg(long, default_value_t = 5.0)]
    pub connect_timeout: f64,
    /// Milliseconds between keepalives sent upstream while a request is in progress.
    #[arg(long, default_value_t = 1000)]
    pub keepalive_ms: u64,
    /// Most diffusion requests computed together in one batch (requests of one length
    /// and steps per block; each keeps its own random draws, so its output does not
    /// change). 1: every request alone. AR steps are never batched.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Milliseconds a batch waits for more requests of its length after the first
    /// (requests that arrived while the last batch computed join at once).
    #[arg(long, default_value_t = 1.0)]
    pub batch_window_ms: f64,
    #[command(flatten)]
    pub guard: GuardArgs,
    /// Announcing this server to a coordinator's registry.
    #[command(flatten)]
    pub announce: crate::cmd::registry::AnnounceArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Who may use a block server, where it forwards, and how much it takes.
#[derive(Args, Debug, Clone)]
pub struct GuardArgs {
    /// This server's key file (hex secret seed, created on first use): it signs the
    /// server's Hello to the next stage and is shown in its greeting. Default: a fresh
    /// key each start (enough with --join-secret-file; an allowlist needs a fixed key).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Admit only clients (and upstream servers) whose public key is in this file, one
    /// 64-hex-digit key per line. Requests then need a Hello signing the connection's
    /// challenge.
    #[arg(long)]
    pub allow_keys: Option<PathBuf>,
    /// Admit only clients that prove they know the secret in this file (its first line),
    /// besides signing their Hello. Servers of a route share it and use it downstream.
    #[arg(long)]
    pub join_secret_file: Option<PathBuf>,
    /// The only addresses this server forwards to, as routes write them: a file of
    /// host:port lines or a comma-separated list. Exclusive: a route naming any other
    /// address is refused. Without it, any address on the route whose greeting shows
    /// this model and the route's blocks (and, for a server not on loopback, not this
    /// host).
    #[arg(long)]
    pub peers: Option<String>,
    /// Most open TCP connections.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Most open TCP connections from one client IP address.
    #[arg(long, default_value_t = 128)]
    pub max_connections_per_ip: usize,
    /// Most requests computing or waiting for the compute at once (more are refused as
    /// busy, and the caller tries another replica).
    #[arg(long, default_value_t = 64)]
    pub max_inflight: usize,
    /// Compute budget of one diffusion request: tokens x steps per block.
    #[arg(long, default_value_t = 1 << 22)]
    pub max_token_steps: u64,
    /// MiB of frames all connections may hold at once, from each frame's declared size
    /// until its request is done (frames of 64 KiB or less are not counted); a frame
    /// that does not fit is refused as busy (the caller tries another replica), its
    /// payload discarded. At least --max-frame-mb.
    #[arg(long, default_value_t = 1024)]
    pub max_buffered_mb: usize,
    /// Requests per second per client (its key when the key is on --allow-keys, else its
    /// IP address, an IPv6 host per /64); 0: no limit.
    /// An upstream server counts as one client for all the requests it forwards.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Requests a client may make at once before --rate applies.
    #[arg(long, default_value_t = 200.0)]
    pub burst: f64,
    /// Seconds after which an idle connection is closed.
    #[arg(long, default_value_t = 300.0)]
    pub idle_timeout: f64,
    /// Seconds a frame's header may take once its first byte has arrived.
    #[arg(long, default_value_t = 10.0)]
    pub frame_timeout: f64,
    /// Slowest transfer of a frame's payload accepted, KiB/s (its deadline is
    /// --frame-timeout plus its size at this rate).
    #[arg(long, default_value_t = 256)]
    pub min_frame_rate_kib: u64,
}

impl GuardArgs {
    /// The server options these flags set (over `opts`).
    pub fn apply(&self, opts: ServeOptions) -> Result<ServeOptions> {
        use blocktrain_serve::server::auth;
        if !(self.idle_timeout > 0.0 && self.frame_timeout > 0.0) {
            bail!("--idle-timeout and --frame-timeout must be positive");
        }
        if self.max_connections == 0 || self.max_connections_per_ip == 0 || self.max_inflight == 0 {
            bail!(
                "--max-connections, --max-connections-per-ip and --max-inflight must be at least 1"
            );
        }
        if !(self.rate >= 0.0 && self.rate.is_finite() && self.burst >= 1.0) {
            bail!("--rate must be 0 or more and --burst at least 1");
        }
        let identity = match &self.key {
            Some(p) => auth::load_or_create_key(p)?,
            None => opts.identity.clone(),
        };
        let peers = match &self.peers {
            Some(arg) => Some(blocktrain_serve::client::load_route(arg).context("--peers")?),
            None => None,
        };
        Ok(ServeOptions {
            identity,
            peers,
            auth: ClientAuth {
                allow: self
                    .allow_keys
                    .as_deref()
                    .map(auth::load_allow_keys)
                    .transpose()?,
                join_secret: self
                    .join_secret_file
                    .as_deref()
                    .map(auth::load_join_secret)
                    .transpose()?,
            },
            caps: Caps {
                max_connections: self.max_connections,
                max_connections_per_ip: self.max_connections_per_ip,
                max_inflight: self.max_inflight,
                max_token_steps: self.max_token_steps,
                rate: self.rate,
                burst: self.burst,
                max_buffered: self.max_buffered_mb.saturating_mul(1 << 20),
                ..Caps::default()
            },
            idle_timeout: Duration::from_secs_f64(self.idle_timeout),
            frame_deadline: FrameDeadline {
                header: Duration::from_secs_f64(self.frame_timeout),
                min_bytes_per_s: self.min_frame_rate_kib.max(1) * 1024,
            },
            ..opts
        })
    }
}

/// Starts `blocktrain serve ARGS` as a child process (inside network namespace `ns` when
/// given) and waits for the line announcing its address. The child's stdout is consumed;
/// its stderr goes to `stderr`. Kill the child when done.
pub fn spawn_process(
    ns: Option<&str>,
    args: &[String],
    stderr: std::process::Stdio,
) -> Result<(std::process::Child, String)> {
    use std::io::BufRead;
    let exe = std::env::current_exe().context("locating the blocktrain binary")?;
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&exe);
            c
        }
        None => std::process::Command::new(&exe),
    };
    let mut child = cmd
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("starting a block server")?;
    let mut line = String::new();
    let read = std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line);
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|_| line.starts_with("serving"))
        .map(str::to_string);
    match (read, addr) {
        (Ok(_), Some(addr)) => Ok((child, addr)),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("block server did not start (it printed {line:?})")
        }
    }
}

/// Limits from the shared timeout flags.
pub fn limits(stall: f64, connect: f64, max_frame_mb: u32) -> Result<HopLimits> {
    if !(stall > 0.0 && connect > 0.0) {
        bail!("timeouts must be positive");
    }
    Ok(HopLimits {
        connect_timeout: Duration::from_secs_f64(connect),
        stall_timeout: Duration::from_secs_f64(stall),
        max_frame: max_frame_mb.saturating_mul(1 << 20),
        ..HopLimits::default()
    })
}

/// Runs `blocktrain serve` until Ctrl-C.
pub fn run(args: ServeArgs) -> Result<()> {
    crate::cmd::coordinator::init_logging();
    let device = args.device.setup()?;
    let source = match (&args.checkpoint, &args.logical_shape) {
        (Some(dir), _) => Source::Checkpoint(dir),
        (None, Some(shape)) => Source::Logical {
            shape,
            ar: args.ar,
            total: args.total,
            seed: args.seed,
            block_layers: args.block_layers.as_deref(),
        },
        (None, None) => bail!("give --checkpoint DIR or --logical-shape SHAPE"),
    };
    let hosted = Hosted::load(source, args.blocks, device, args.max_tokens)?;
    if !(args.hop_deadline_s > 0.0 && args.hop_deadline_s.is_finite()) {
        bail!("--hop-deadline-s must be positive");
    }
    let limits = HopLimits {
        call_deadline: Duration::from_secs_f64(args.hop_deadline_s),
        ..limits(args.stall_timeout, args.connect_timeout, args.max_frame_mb)?
    };
    if let Some(e) = hosted.latent_width() {
        // The latent of the longest sequence this server takes must fit one frame, or
        // the next stage would refuse it after all the compute.
        let n = args.max_tokens as u64;
        let body = n + n.div_ceil(8) + 2 * n * e as u64;
        if body + frame::MAX_META as u64 > limits.max_frame as u64 {
            bail!(
                "a latent of {n} positions x {e} takes {body} bytes, more than --max-frame-mb {} allows with its metadata: lower --max-tokens or raise --max-frame-mb",
                args.max_frame_mb
            );
        }
    }
    if args.guard.max_buffered_mb < args.max_frame_mb as usize {
        bail!(
            "--max-buffered-mb {} is less than --max-frame-mb {}: the largest frames would always be refused",
            args.guard.max_buffered_mb,
            args.max_frame_mb
        );
    }
    if !(1..=MAX_BATCH_LIMIT).contains(&args.max_batch) {
        bail!("--max-batch must be 1..={MAX_BATCH_LIMIT}");
    }
    if !(0.0..=1000.0).contains(&args.batch_window_ms) {
        bail!("--batch-window-ms must be 0..=1000");
    }
    let opts = args.guard.apply(ServeOptions {
        limits,
        keepalive: Duration::from_millis(args.keepalive_ms.max(10)),
        name: args.name.clone().unwrap_or_default(),
        batch: BatchOptions {
            max_batch: args.max_batch,
            window: Duration::from_secs_f64(args.batch_window_ms / 1e3),
        },
        ..ServeOptions::default()
    })?;
    let key = opts.identity.public_hex();
    if !args.listen.ip().is_loopback() && !opts.auth.required() {
        eprintln!(
            "note: serving on {} to any client (give --allow-keys or --join-secret-file to restrict it)",
            args.listen
        );
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let i = &hosted.info;
        println!(
            "serving {} {} {} of {} (model {}, key {key}) on {addr}",
            i.family,
            if i.family == "ar" { "layers" } else { "blocks" },
            i.blocks,
            i.total,
            i.model_id
        );
        // Asking its own server for its counters, it authenticates as any client would.
        let own_limits = HopLimits {
            credentials: Some(std::sync::Arc::new(Credentials {
                identity: opts.identity.clone(),
                join_secret: opts.auth.join_secret.clone(),
            })),
            ..HopLimits::default()
        };
        let announce = crate::cmd::registry::announce_forever(
            args.announce.clone(),
            addr.to_string(),
            hosted.info.clone(),
            opts.identity.clone(),
            own_limits,
        );
        tokio::select! {
            _ = serve(listener, hosted, opts) => {}
            r = announce, if args.announce.registry.is_some() => r?,
            _ = tokio::signal::ctrl_c() => eprintln!("stopping"),
        }
        Ok(())
    })
}
