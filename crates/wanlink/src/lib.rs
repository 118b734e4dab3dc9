//! Emulated WAN links for tests and benchmarks: a user-space TCP proxy that adds one-way
//! delay and a rate limit to each direction of every connection through it.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use blocktrain_wanlink::{spawn_link, LinkSpec};
//! let spec = LinkSpec::parse("25ms,100mbit")?;
//! let link = spawn_link("127.0.0.1:0".parse()?, "127.0.0.1:7000".parse()?, spec).await?;
//! // connect to link.local_addr() instead of 127.0.0.1:7000
//! # Ok(()) }
//! ```
//!
//! # Model
//! Each direction is independent. The proxy reads a chunk (at most ~2 ms of serialisation,
//! ≤ 64 KiB), serialises it at the rate with a token bucket (4 ms burst, like `tbf`), and
//! delivers it `delay` after its serialisation ends. The reader does not wait for delivery,
//! so many chunks are in flight at once (delay is pipelined, not slept per chunk). Hence a
//! bulk transfer of N bytes takes ≈ delay + N·8/rate and a small request/response ≈ 2·delay.
//! The reader stops when the link is busy (and when > max(4 MiB, 2·BDP) is buffered), so
//! the sender feels backpressure as on a real link. EOF travels with the same delay and
//! half-closes the other side; an error on either side (reset, broken pipe) closes both
//! sockets, a read error one delay later. Timers add -0.25..+0.75 ms per one-way trip.
//!
//! **Connection set-up costs one RTT**, as a TCP handshake does: the proxy carries nothing
//! for 2·delay after it accepts a connection (and only then connects upstream), so the
//! first request/response on a new connection takes ≈ 2 RTT and later exchanges ≈ 1 RTT.
//! The client's `connect()` itself returns at once (the local kernel accepted it); the
//! cost shows on its first byte. Without this a new connection would be free and a
//! benchmark could not see what connection reuse saves. Not modelled: jitter, loss,
//! reordering.
//!
//! # Why not `noxious`
//! `noxious` 1.0.4 (the Rust Toxiproxy port) was checked as a library: its latency toxic
//! sleeps for the latency on each chunk in sequence (`stream.then(sleep)`), which caps
//! throughput at one chunk per delay; its bandwidth toxic is in whole KB/s and sends 100-byte
//! pieces every 100 ms when a chunk is large; driving it needs its request channels and
//! stop/close signals; it has no byte counters; and it pulls in ~100 crates (tokio-util 0.6,
//! rand 0.8, futures, mockall_double, ...). This proxy is a few hundred lines of tokio.
mod link;
mod probe;
mod spec;
mod thread;

pub use link::{spawn_link, spawn_link_with_cuts, Cuts, LinkHandle};
pub use probe::{
    bulk_bytes_for, measure, measure_blocking, probe, probe_blocking, spawn_echo, EchoHandle, Probe,
};
pub use spec::{LinkSpec, ParseLinkSpecError};
pub use thread::{spawn_link_thread, spawn_link_thread_with_cuts, wait_for_ctrl_c, ThreadLink};
