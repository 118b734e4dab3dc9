//! Checking a link: an echo/sink server and a client that measures RTT and throughput.
//!
//! Protocol of [`spawn_echo`]'s server: the client's first byte picks the mode.
//! `E`: echo every following byte until EOF, then close. `S`: sink every following byte
//! until EOF, then reply with three big-endian u64s (bytes received, bytes received after
//! the first read, nanoseconds from the first to the last read) and close.
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::{spawn_link, LinkSpec};

/// Round trips timed for the RTT (after one warm-up).
const RTT_ROUNDS: usize = 5;
/// Size of each echoed message.
const RTT_MSG: usize = 64;

/// A running echo/sink server; dropping it stops it.
#[derive(Debug)]
pub struct EchoHandle {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl EchoHandle {
    /// Where the server listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for EchoHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the echo/sink server used by [`probe`] (use port 0 for any free port).
pub async fn spawn_echo(listen: SocketAddr) -> anyhow::Result<EchoHandle> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("echo: cannot listen on {listen}"))?;
    let local_addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => drop(conns.spawn(serve(s))),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    });
    Ok(EchoHandle { local_addr, task })
}

async fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    match s.read_u8().await? {
        b'E' => {
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await
        }
        b'S' => {
            let mut buf = vec![0u8; 256 * 1024];
            let (mut total, mut first_len, mut first, mut last) = (0u64, 0u64, None, None);
            loop {
                let n = s.read(&mut buf).await? as u64;
                if n == 0 {
                    break;
                }
                let now = Instant::now();
                if first.is_none() {
                    (first, first_len) = (Some(now), n);
                }
                last = Some(now);
                total += n;
            }
            let nanos = match (first, last) {
                (Some(f), Some(l)) => (l - f).as_nanos() as u64,
                _ => 0,
            };
            let mut reply = [0u8; 24];
            reply[..8].copy_from_slice(&total.to_be_bytes());
            reply[8..16].copy_from_slice(&(total - first_len).to_be_bytes());
            reply[16..].copy_from_slice(&nanos.to_be_bytes());
            s.write_all(&reply).await?;
            s.shutdown().await
        }
        _ => Ok(()),
    }
}

/// What [`probe`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Probe {
    /// Median round trip of a small message, ms.
    pub rtt_ms: f64,
    /// Fastest such round trip, ms.
    pub rtt_min_ms: f64,
    /// Size of the bulk transfer, bytes.
    pub bulk_bytes: u64,
    /// Wall time from the first byte written to the sink's reply: ≈ bytes·8/rate + RTT.
    pub bulk_secs: f64,
    /// Throughput seen by the receiver (bytes after its first read over the time to its
    /// last read), Mbit/s (10^6 bit/s).
    pub mbit_per_s: f64,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rtt {:.1} ms (min {:.1}), {:.1} mbit/s ({:.2} MB in {:.3} s)",
            self.rtt_ms,
            self.rtt_min_ms,
            self.mbit_per_s,
            self.bulk_bytes as f64 / 1e6,
            self.bulk_secs
        )
    }
}

impl Probe {
    /// Errors unless the measured RTT and rate are within `tolerance` (e.g. 0.25) of what
    /// `spec` promises. RTT gets 3 ms of slack on top (timer granularity, scheduling).
    pub fn check(&self, spec: &LinkSpec, tolerance: f64) -> anyhow::Result<()> {
        let want_rtt = spec.rtt().as_secs_f64() * 1e3;
        ensure!(
            (self.rtt_ms - want_rtt).abs() <= want_rtt * tolerance + 3.0,
            "link {spec}: measured rtt {:.1} ms, expected {want_rtt:.1} ms ±{:.0}%",
            self.rtt_ms,
            tolerance * 100.0
        );
        if let Some(r) = spec.rate_bits_per_s {
            let want = r as f64 / 1e6;
            ensure!(
                (self.mbit_per_s - want).abs() <= want * tolerance,
                "link {spec}: measured {:.2} mbit/s, expected {want:.2} ±{:.0}%",
                self.mbit_per_s,
                tolerance * 100.0
            );
        }
        Ok(())
    }
}

/// Measures the link in front of an echo server ([`spawn_echo`]) at `addr`: the RTT of small
/// echoes, then a one-way bulk transfer of `bulk_bytes` (pick ≥ 0.5 s worth of the rate).
pub async fn probe(addr: SocketAddr, bulk_bytes: usize) -> anyhow::Result<Probe> {
    let not_echo = || format!("probe: {addr} closed early; is it a wanlink echo server?");
    let mut s = connect(addr).await?;
    s.write_all(b"E").await?;
    let msg = [7u8; RTT_MSG];
    let mut back = [0u8; RTT_MSG];
    let mut rtts = Vec::with_capacity(RTT_ROUNDS);
    for i in 0..=RTT_ROUNDS {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await.with_context(not_echo)?;
        if i > 0 {
            rtts.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    drop(s);
    rtts.sort_by(f64::total_cmp);

    let mut s = connect(addr).await?;
    let data = vec![0x5au8; bulk_bytes];
    let t = Instant::now();
    s.write_all(b"S").await?;
    s.write_all(&data).await?;
    s.shutdown().await?;
    let mut reply = [0u8; 24];
    s.read_exact(&mut reply).await.with_context(not_echo)?;
    let bulk_secs = t.elapsed().as_secs_f64();
    let field = |i: usize| u64::from_be_bytes(reply[8 * i..8 * i + 8].try_into().unwrap());
    let (total, after_first, nanos) = (field(0), field(1), field(2));
    if total != bulk_bytes as u64 {
        bail!("probe: sink at {addr} got {total} of {bulk_bytes} bytes");
    }
    let rtt_ms = rtts[rtts.len() / 2];
    let mbit_per_s = if nanos > 0 && after_first * 2 >= total {
        after_first as f64 * 8e3 / nanos as f64
    } else {
        // Arrived in one or two reads: fall back to wall time less the RTT.
        total as f64 * 8.0 / (bulk_secs - rtt_ms / 1e3).max(1e-6) / 1e6
    };
    Ok(Probe {
        rtt_ms,
        rtt_min_ms: rtts[0],
        bulk_bytes: total,
        bulk_secs,
        mbit_per_s,
    })
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("probe: cannot reach {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Starts an echo server and a link with `spec` in front of it on loopback, probes through
/// it, and stops both: what a benchmark runs to report the link it actually emulated.
pub async fn measure(spec: LinkSpec, bulk_bytes: usize) -> anyhow::Result<Probe> {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let echo = spawn_echo(any).await?;
    let link = spawn_link(any, echo.local_addr(), spec).await?;
    probe(link.local_addr(), bulk_bytes).await
}

/// Blocking [`probe`].
pub fn probe_blocking(addr: SocketAddr, bulk_bytes: usize) -> anyhow::Result<Probe> {
    crate::thread::runtime()?.block_on(probe(addr, bulk_bytes))
}

/// Blocking [`measure`].
pub fn measure_blocking(spec: LinkSpec, bulk_bytes: usize) -> anyhow::Result<Probe> {
    crate::thread::runtime()?.block_on(measure(spec, bulk_bytes))
}

/// Bulk size for a probe that takes about `secs` at the spec's rate (8 MiB if unlimited),
/// clamped to [64 KiB, 256 MiB].
pub fn bulk_bytes_for(spec: &LinkSpec, secs: f64) -> usize {
    spec.rate_bits_per_s
        .map_or(8 << 20, |r| (r as f64 / 8.0 * secs) as usize)
        .clamp(64 << 10, 256 << 20)
}
