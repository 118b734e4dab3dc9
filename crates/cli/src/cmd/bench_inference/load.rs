//! Concurrent clients (`--clients N,...`): N clients send requests back to back to one
//! deployed system, and the run reports requests/s and the latency distribution.
//!
//! Each client is a tokio task with its own connection pool, as separate client machines
//! would have: the pooled client -> host 3 connection is that client's own, never shared
//! with another client (sharing one pool would hand one client's warm connection to
//! another and hide the handshakes separate clients pay). The hop -> hop connections are
//! the servers' own pools, shared by every request passing through them, as in a real
//! deployment. Every client first makes one untimed warm-up request (its connections,
//! first-touch allocations), then all start together; the wall time runs from that start
//! to the last client's last answer. The servers' batch counters are read (on direct
//! connections, off the links) at that start and after the last answer, so each run
//! reports the mean batch its timed requests were computed in.
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use blocktrain_serve::client::{self, Plan, Request};
use blocktrain_serve::hop::{HopLimits, Pool};
use serde_json::{json, Value};
use tokio::sync::Barrier;

use super::{Deployment, Setup, System};

/// One request's measurements.
pub(super) struct Sample {
    /// Seconds from sending it to its last byte.
    pub(super) seconds: f64,
    /// Seconds from the request (first byte) or the byte before (the others) to each
    /// output byte: the AR pipeline's per-token latency. Empty for diffusion, whose bytes
    /// all arrive at once.
    pub(super) token_seconds: Vec<f64>,
    pub(super) traversals: usize,
    /// Compute the servers reported for it, seconds.
    pub(super) compute_s: f64,
}

/// N clients' run against one system.
pub(super) struct Load {
    pub(super) clients: usize,
    pub(super) samples: Vec<Sample>,
    /// From the common start to the last answer.
    pub(super) wall_s: f64,
    /// What the system's links carried during the timed requests (both directions).
    pub(super) bytes: u64,
    /// Client connections the clients' pools opened and reused during the whole run
    /// (warm-up included).
    pub(super) opened: u64,
    pub(super) reused: u64,
    /// Diffusion batches the three servers computed during the timed requests, and the
    /// requests in them (summed over the hosts).
    pub(super) batches: (u64, u64),
}

/// The `q` quantile (0..=1) of `sorted` by nearest rank; 0 when empty.
pub(super) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

impl Load {
    pub(super) fn latencies(&self) -> Vec<f64> {
        sorted(self.samples.iter().map(|s| s.seconds).collect())
    }

    pub(super) fn token_latencies(&self) -> Vec<f64> {
        sorted(
            self.samples
                .iter()
                .flat_map(|s| s.token_seconds.iter().copied())
                .collect(),
        )
    }

    pub(super) fn requests_per_s(&self) -> f64 {
        self.samples.len() as f64 / self.wall_s
    }

    /// The request whose latency is the median (the one-client table reports it).
    pub(super) fn median(&self) -> &Sample {
        let mut by: Vec<&Sample> = self.samples.iter().collect();
        by.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        by[(by.len() - 1) / 2]
    }

    /// Requests per batch the servers computed (None: no batch, as for the AR pipeline).
    pub(super) fn mean_batch(&self) -> Option<f64> {
        let (batches, requests) = self.batches;
        (batches > 0).then(|| requests as f64 / batches as f64)
    }

    pub(super) fn to_json(&self) -> Value {
        let lat = self.latencies();
        let tok = self.token_latencies();
        let traversals: usize = self.samples.iter().map(|s| s.traversals).sum();
        json!({
            "clients": self.clients,
            "requests": self.samples.len(),
            "wall_seconds": self.wall_s,
            "requests_per_s": self.requests_per_s(),
            "latency": {"count": lat.len(), "p50": quantile(&lat, 0.5), "p99": quantile(&lat, 0.99),
                        "max": lat.last().copied().unwrap_or(0.0)},
            "token_latency": (!tok.is_empty()).then(|| json!({
                "count": tok.len(), "p50": quantile(&tok, 0.5), "p99": quantile(&tok, 0.99)})),
            "traversals": traversals,
            "bytes": self.bytes,
            "bytes_per_request": self.bytes as f64 / self.samples.len().max(1) as f64,
            "client_connections_opened": self.opened,
            "client_connections_reused": self.reused,
            "server_batches": self.batches.0,
            "server_batched_requests": self.batches.1,
            "mean_batch": self.mean_batch(),
            "latencies": lat,
        })
    }
}

/// One request, timing each output byte as the client receives it.
async fn one(plan: &Plan, req: &Request, limits: &HopLimits, system: System) -> Result<Sample> {
    let started = Instant::now();
    let mut token_seconds = Vec::new();
    let g = if system == System::Ar {
        let mut last = started;
        let mut on_byte = |_: u8| {
            let now = Instant::now();
            token_seconds.push(now.duration_since(last).as_secs_f64());
            last = now;
            true
        };
        client::generate_ar_with(plan, req, limits, &mut on_byte).await?
    } else {
        client::generate(plan, req, limits).await?
    };
    Ok(Sample {
        seconds: g.seconds,
        token_seconds,
        traversals: g.traversals,
        compute_s: g.hops.iter().map(|h| h.compute_ms).sum::<f64>() / 1e3,
    })
}

/// `clients` clients each send `warm` once (untimed), wait for the others (and the
/// servers' batch counters to be read), then send `req` `per_client` times back to back.
pub(super) fn run_load(
    d: &Deployment,
    system: System,
    (warm, req): (&Request, &Request),
    clients: usize,
    per_client: usize,
    limits: &HopLimits,
) -> Result<Load> {
    let rt = tokio::runtime::Runtime::new()?;
    let plan = Arc::new(d.plan.clone());
    let warmed_up = Arc::new(Barrier::new(clients + 1));
    let start = Arc::new(Barrier::new(clients + 1));
    let pools: Vec<Arc<Pool>> = (0..clients).map(|_| Arc::new(Pool::default())).collect();
    let tasks: Vec<_> = pools
        .iter()
        .map(|pool| {
            let limits = HopLimits {
                pool: Some(pool.clone()),
                ..limits.clone()
            };
            let (plan, warmed_up, start) = (plan.clone(), warmed_up.clone(), start.clone());
            let (warm, req) = (warm.clone(), req.clone());
            rt.spawn(async move {
                let warmed = one(&plan, &warm, &limits, system).await;
                // Wait even after a failure, so the others are not left at the barrier.
                warmed_up.wait().await;
                start.wait().await;
                warmed?;
                let mut samples = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    samples.push(one(&plan, &req, &limits, system).await?);
                }
                anyhow::Ok(samples)
            })
        })
        .collect();
    let (samples, wall_s, bytes, batches) = rt.block_on(async {
        warmed_up.wait().await;
        let counted = d.batch_counts().await?;
        start.wait().await;
        let (before, t0) = (d.link_bytes(), Instant::now());
        let mut samples = Vec::new();
        for t in tasks {
            samples.extend(t.await.map_err(|e| anyhow!("client task: {e}"))??);
        }
        let (wall, bytes) = (t0.elapsed().as_secs_f64(), d.link_bytes() - before);
        let now = d.batch_counts().await?;
        let batches = (now.0 - counted.0, now.1 - counted.1);
        anyhow::Ok((samples, wall, bytes, batches))
    })?;
    Ok(Load {
        clients,
        samples,
        wall_s,
        bytes,
        opened: pools.iter().map(|p| p.opened()).sum(),
        reused: pools.iter().map(|p| p.reused()).sum(),
        batches,
    })
}

/// The goal for one system over its runs (ascending N): throughput grows with N,
/// and p99 at N = 4 stays below 3x the one-client p99.
pub(super) fn goal(loads: &[Load]) -> Value {
    let rps: Vec<f64> = loads.iter().map(Load::requests_per_s).collect();
    let grows = (rps.len() > 1).then(|| rps.windows(2).all(|w| w[1] > w[0]));
    let p99 = |n: usize| {
        loads
            .iter()
            .find(|l| l.clients == n)
            .map(|l| quantile(&l.latencies(), 0.99))
    };
    let ratio = p99(4).zip(p99(1)).map(|(a, b)| a / b);
    json!({
        "throughput_grows": grows,
        "p99_ratio_n4_vs_n1": ratio,
        "p99_within_3x_at_n4": ratio.map(|r| r < 3.0),
        "met": grows.zip(ratio).map(|(g, r)| g && r < 3.0),
    })
}

/// Prints the load table (when more than one N was measured), the goal per system,
/// batch setting and length, and with several batch settings each one's throughput and
/// p99 against the first's at every N; returns them as JSON.
pub(super) fn report(loads: &[(usize, Setup, Vec<Load>)]) -> Value {
    let shown = loads.iter().any(|(_, _, runs)| runs.len() > 1);
    if shown {
        println!("\nConcurrent clients, each sending its requests back to back (latency per request; AR also per token):\n");
        println!("| output bytes | system | max batch | clients | requests/s | vs 1 client | p50 s | p99 s | requests | mean batch | AR per token p50 / p99 ms (tokens) |");
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    }
    let mut out = Vec::new();
    for (len, setup, runs) in loads {
        if shown {
            print_rows(*len, *setup, runs);
        }
        out.push(json!({
            "len": len,
            "system": setup.system.name(),
            "max_batch": setup.max_batch,
            "runs": runs.iter().map(Load::to_json).collect::<Vec<_>>(),
            "goal": goal(runs),
        }));
    }
    if shown {
        println!();
        for (len, setup, runs) in loads {
            let g = goal(runs);
            println!(
                "goal at {len} bytes, {} (max batch {}): throughput grows with N: {}; p99 at N=4 / N=1: {}",
                setup.system.name(),
                setup.batch_cell(),
                g["throughput_grows"],
                g["p99_ratio_n4_vs_n1"]
                    .as_f64()
                    .map_or("not measured".into(), |r| format!(
                        "{r:.2} ({})",
                        if r < 3.0 { "below 3x" } else { "NOT below 3x" }
                    )),
            );
        }
        compare_batching(loads);
    }
    Value::Array(out)
}

/// Each batch setting of a system against the first one measured, at every N of one
/// length: requests/s and p99 as ratios (both measured in this run).
fn compare_batching(loads: &[(usize, Setup, Vec<Load>)]) {
    for (i, (len, setup, runs)) in loads.iter().enumerate() {
        let Some((_, base, base_runs)) = loads[..i]
            .iter()
            .find(|(l, s, _)| l == len && s.system == setup.system)
        else {
            continue;
        };
        for (l, b) in runs.iter().zip(base_runs) {
            let p99 = |l: &Load| quantile(&l.latencies(), 0.99);
            println!(
                "{} at {len} bytes, {} clients: max batch {} vs {}: requests/s x{:.2}, p99 x{:.2}",
                setup.system.name(),
                l.clients,
                setup.batch_cell(),
                base.batch_cell(),
                l.requests_per_s() / b.requests_per_s(),
                p99(l) / p99(b),
            );
        }
    }
}

fn print_rows(len: usize, setup: Setup, loads: &[Load]) {
    let base = loads.first().map(|l| l.requests_per_s());
    for l in loads {
        let lat = l.latencies();
        let tok = l.token_latencies();
        let tok_cell = if tok.is_empty() {
            "-".to_string()
        } else {
            format!(
                "{:.1} / {:.1} ({})",
                quantile(&tok, 0.5) * 1e3,
                quantile(&tok, 0.99) * 1e3,
                tok.len()
            )
        };
        println!(
            "| {len} | {} | {} | {} | {:.2} | {} | {:.3} | {:.3} | {} | {} | {tok_cell} |",
            setup.system.name(),
            setup.batch_cell(),
            l.clients,
            l.requests_per_s(),
            base.map_or("-".into(), |b| format!("{:.2}x", l.requests_per_s() / b)),
            quantile(&lat, 0.5),
            quantile(&lat, 0.99),
            lat.len(),
            l.mean_batch().map_or("-".into(), |m| format!("{m:.2}")),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0], 0.5), 2.0);
        assert_eq!(quantile(&[1.0, 2.0], 0.99), 2.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
