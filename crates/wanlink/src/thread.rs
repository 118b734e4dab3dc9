//! Blocking wrappers for callers without a tokio runtime (the CLI, benchmarks).
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use anyhow::Context;
use tokio::sync::oneshot;

use crate::link::Counters;
use crate::LinkSpec;

/// A link running on its own thread and tokio runtime. Dropping it (or
/// [`ThreadLink::shutdown`]) stops the proxy and joins the thread.
#[derive(Debug)]
pub struct ThreadLink {
    local_addr: SocketAddr,
    spec: LinkSpec,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Blocking [`crate::spawn_link`]: returns once the proxy listens.
pub fn spawn_link_thread(
    listen: SocketAddr,
    upstream: SocketAddr,
    spec: LinkSpec,
) -> anyhow::Result<ThreadLink> {
    spawn_link_thread_with_cuts(listen, upstream, spec, None)
}

/// Blocking [`crate::spawn_link_with_cuts`].
pub fn spawn_link_thread_with_cuts(
    listen: SocketAddr,
    upstream: SocketAddr,
    spec: LinkSpec,
    cuts: Option<crate::Cuts>,
) -> anyhow::Result<ThreadLink> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("wanlink-{listen}"))
        .spawn(move || {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            rt.block_on(async move {
                match crate::spawn_link_with_cuts(listen, upstream, spec, cuts).await {
                    Ok(link) => {
                        let _ = ready_tx.send(Ok((link.local_addr(), link.counters())));
                        let _ = stop_rx.await; // sender dropped or fired: stop
                        link.shutdown().await;
                    }
                    Err(e) => drop(ready_tx.send(Err(e))),
                }
            });
        })?;
    let (local_addr, counters) = ready_rx
        .recv()
        .context("link thread died before it listened")??;
    Ok(ThreadLink {
        local_addr,
        spec,
        counters,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// The small runtime every blocking helper uses.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("wanlink")
        .enable_all()
        .build()
        .context("cannot start a tokio runtime for the link")
}

impl ThreadLink {
    /// Connections cut so far ([`crate::Cuts`]).
    pub fn cut_connections(&self) -> u64 {
        self.counters.cut.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
    /// The emulated link.
    pub fn spec(&self) -> LinkSpec {
        self.spec
    }
    /// Bytes delivered client → upstream so far.
    pub fn bytes_up(&self) -> u64 {
        self.counters.up.load(Ordering::Relaxed)
    }
    /// Bytes delivered upstream → client so far.
    pub fn bytes_down(&self) -> u64 {
        self.counters.down.load(Ordering::Relaxed)
    }
    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.counters.connections.load(Ordering::Relaxed)
    }
    /// Stops the proxy and waits until its port is released.
    pub fn shutdown(self) {} // Drop does the work
}

impl Drop for ThreadLink {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Blocks until Ctrl-C (SIGINT) arrives.
pub fn wait_for_ctrl_c() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(tokio::signal::ctrl_c())
        .context("cannot listen for Ctrl-C")
}
