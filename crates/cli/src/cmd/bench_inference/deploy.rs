//! One system deployed on the three hosts: its `blocktrain serve` processes (in their
//! namespaces with `--hosts netns`), the emulated links in front of them, and the route.
use std::net::SocketAddr;
use std::process::{Child, Stdio};

use anyhow::{bail, Result};
use blocktrain_serve::client::{self, Plan};
use blocktrain_serve::hop::HopLimits;
use blocktrain_wanlink::{spawn_link_thread, LinkSpec, ThreadLink};

use super::HOSTS;
use crate::args::DeviceArgs;
use crate::cmd::bench_network::Hosts;

/// A server process, killed on drop.
struct ServerProc(Child);

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `blocktrain serve` (in namespace `ns` if given) with `source` and `extra`
/// arguments; returns it and its address.
fn start_server(
    ns: Option<&str>,
    listen: &str,
    source: &[String],
    extra: &[String],
    device: &DeviceArgs,
) -> Result<(ServerProc, SocketAddr)> {
    let mut args = source.to_vec();
    for a in [
        "--listen",
        listen,
        "--device",
        &device.device,
        "--max-tokens",
        "8192",
        // The bench's clients all reach host 3 through one link address: a rate per
        // address would count them as one client.
        "--rate",
        "0",
    ] {
        args.push(a.to_string());
    }
    args.extend(extra.iter().cloned());
    if let Some(t) = device.threads {
        args.extend(["--threads".to_string(), t.to_string()]);
    }
    let (child, addr) = crate::cmd::serve::spawn_process(ns, &args, Stdio::inherit())?;
    Ok((ServerProc(child), addr.parse()?))
}

/// One system (diffusion or AR) on the three hosts, behind its links.
pub(super) struct Deployment {
    _servers: Vec<ServerProc>,
    /// The servers' own addresses (host k at index k-1), reached without a link.
    addrs: Vec<SocketAddr>,
    links: Vec<ThreadLink>,
    pub(super) plan: Plan,
}

impl Deployment {
    /// Bytes the system's links have carried (both directions).
    pub(super) fn link_bytes(&self) -> u64 {
        self.links
            .iter()
            .map(|l| l.bytes_up() + l.bytes_down())
            .sum()
    }

    /// Diffusion batches the three servers have computed and the requests in them, read
    /// from their greetings on direct connections (no link, so no bytes counted and no
    /// delay).
    pub(super) async fn batch_counts(&self) -> Result<(u64, u64)> {
        let limits = HopLimits::default().unpooled();
        let (mut batches, mut requests) = (0, 0);
        for a in &self.addrs {
            let info = client::server_info(&a.to_string(), &limits)
                .await
                .map_err(|e| anyhow::anyhow!("server {a}: {e}"))?;
            batches += info.batches;
            requests += info.batched;
        }
        Ok((batches, requests))
    }
}

/// Host k (1..=3) serves `sources[k-1]` (with `extra` arguments); hops go client ->
/// host 3 -> host 2 -> host 1.
pub(super) fn deploy(
    hosts: Hosts,
    link: LinkSpec,
    sources: &[Vec<String>],
    extra: &[String],
    device: &DeviceArgs,
    limits: &HopLimits,
) -> Result<Deployment> {
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    for (i, src) in sources.iter().enumerate() {
        let k = i + 1;
        let (ns, listen) = match hosts {
            Hosts::Netns => (Some(format!("bt-h{k}")), format!("10.77.{k}.2:0")),
            Hosts::Loopback => (None, "127.0.0.1:0".to_string()),
        };
        let (p, a) = start_server(ns.as_deref(), &listen, src, extra, device)?;
        servers.push(p);
        addrs.push(a);
    }
    // The link into host k listens where its caller is: the client (root namespace)
    // for host 3, host k+1's side of its veth for the others.
    let spec = match hosts {
        Hosts::Netns => LinkSpec {
            delay_ms: link.delay_ms,
            rate_bits_per_s: None,
        },
        Hosts::Loopback => link,
    };
    let mut links = Vec::new();
    let mut route = Vec::new();
    for k in (1..=HOSTS as usize).rev() {
        let listen = match (hosts, k) {
            (Hosts::Netns, k) if k < HOSTS as usize => format!("10.77.{}.1:0", k + 1),
            _ => "127.0.0.1:0".to_string(),
        };
        let l = spawn_link_thread(listen.parse()?, addrs[k - 1], spec)?;
        route.push(l.local_addr().to_string());
        links.push(l);
    }
    let rt = tokio::runtime::Runtime::new()?;
    let plan = rt.block_on(client::discover(&route, limits))?;
    if !plan.unreachable.is_empty() {
        bail!("servers did not answer: {}", plan.unreachable.join("; "));
    }
    Ok(Deployment {
        _servers: servers,
        addrs,
        links,
        plan,
    })
}
