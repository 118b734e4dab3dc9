//! `serve --registry`: the server announces itself, renewed, with the load it measured.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blocktrain_protocol::frame::ServerInfo;
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::registry::Announcement;
use blocktrain_protocol::wire::join_proof;
use blocktrain_serve::client;
use blocktrain_serve::hop::HopLimits;
use blocktrain_train::client::Client;
use clap::Args;

use super::registry_client;

/// Flags of `serve` for announcing to a registry.
#[derive(Args, Debug, Clone)]
pub struct AnnounceArgs {
    /// Announce this server to the coordinator at this URL, renewed every
    /// --announce-every seconds (it expires from the list when the renewals stop).
    #[arg(long)]
    pub registry: Option<String>,
    /// With --registry: the address clients dial (default: the listen address; required
    /// when listening on 0.0.0.0 or ::).
    #[arg(long, requires = "registry")]
    pub public_addr: Option<String>,
    /// With --registry: the coordinator's run join secret, when the run has one and this
    /// server's key (--key) is not a registered worker's. (--join-secret-file is another
    /// secret: the one this server asks of its own clients.)
    #[arg(long, env = "BLOCKTRAIN_JOIN_SECRET", requires = "registry")]
    pub registry_join_secret: Option<String>,
    /// With --registry: seconds between announcements (each lives 3 times as long).
    #[arg(long, default_value_t = 10.0, requires = "registry")]
    pub announce_every: f64,
    /// With an https:// registry: its certificate's SHA-256 fingerprint.
    #[arg(long, requires = "registry", conflicts_with = "registry_tls_ca")]
    pub registry_tls_fingerprint: Option<String>,
    /// With an https:// registry: the CA (PEM) that issued its certificate.
    #[arg(long, requires = "registry")]
    pub registry_tls_ca: Option<PathBuf>,
}

/// Announces the server at `own` (which hosts `info`, with key `id`) to the registry
/// until the task is dropped: every `announce_every` seconds, with the passes per second
/// and mean pass time measured since the last announcement (asked of the server itself).
pub async fn announce_forever(
    args: AnnounceArgs,
    own: String,
    info: ServerInfo,
    id: Identity,
    limits: HopLimits,
) -> Result<()> {
    let Some(url) = args.registry.clone() else {
        return Ok(());
    };
    let public = match &args.public_addr {
        Some(a) => a.clone(),
        None => own.clone(),
    };
    blocktrain_protocol::registry::check_addr(&public)
        .map_err(|e| anyhow::anyhow!("serve --registry: {e} (give --public-addr host:port)"))?;
    let proof = args
        .registry_join_secret
        .as_deref()
        .map(|s| join_proof(s, &id.public_hex()));
    // reqwest's blocking client runs a runtime of its own: it is made, used and dropped
    // on the blocking pool, never in this async task.
    let (u, fp, ca) = (
        url.clone(),
        args.registry_tls_fingerprint.clone(),
        args.registry_tls_ca.clone(),
    );
    let mut c = tokio::task::spawn_blocking(move || {
        registry_client(&u, id, fp.as_deref(), ca.as_deref()).map(|c| OffRuntime(Some(c)))
    })
    .await
    .context("registry client")??;
    let every = Duration::from_secs_f64(args.announce_every.clamp(1.0, 200.0));
    let ttl_secs = (3.0 * every.as_secs_f64()).ceil().clamp(5.0, 600.0) as u32;
    let mut last: Option<(Instant, u64, Option<f64>)> = None;
    // What the last reading gave: passes, passes per second, ms per pass.
    let mut figures: (u64, f64, Option<f64>) = (0, 0.0, None);
    let mut announced = false;
    loop {
        // Its own counters. When they cannot be read this time, the last figures are
        // announced again and the interval goes on: a reading of 0 passes would make
        // the next one count every pass since start as one interval's.
        if let Ok(now) = client::server_info(&own, &limits).await {
            let (served, busy_ms) = busy_of(&now);
            let (passes_per_s, pass_ms) = match last {
                Some((t, s0, b0)) if served >= s0 => {
                    let dt = t.elapsed().as_secs_f64().max(1e-3);
                    let n = served - s0;
                    // The recent mean while it works; idle, its mean since start.
                    let pass = match (busy_ms, b0) {
                        (Some(b), Some(b0)) if n > 0 => Some((b - b0).max(0.0) / n as f64),
                        (Some(b), _) if served > 0 => Some(b / served as f64),
                        _ => None,
                    };
                    (n as f64 / dt, pass)
                }
                _ => (
                    0.0,
                    busy_ms.filter(|_| served > 0).map(|b| b / served as f64),
                ),
            };
            last = Some((Instant::now(), served, busy_ms));
            figures = (served, passes_per_s, pass_ms);
        }
        let (served, passes_per_s, pass_ms) = figures;
        let a = Announcement {
            model_id: info.model_id.clone(),
            family: info.family.clone(),
            blocks: info.blocks,
            total: info.total,
            addr: public.clone(),
            served,
            passes_per_s,
            pass_ms,
            ttl_secs,
            join_proof: proof.clone(),
        };
        let (back, sent) = tokio::task::spawn_blocking(move || {
            let r: blocktrain_train::Result<serde_json::Value> =
                c.0.as_mut()
                    .expect("held until dropped")
                    .post_json("/v1/servers/announce", &a);
            (c, r)
        })
        .await
        .context("announce task")?;
        c = back;
        match sent {
            Ok(_) if !announced => {
                eprintln!("announced to {url} as {public} (renewed every {every:?})");
                announced = true;
            }
            Ok(_) => {}
            // Not admitted is a configuration error: say so and stop. Anything else (a
            // full registry, a conflict, the network) may pass: retried at the next renewal.
            Err(
                e @ (blocktrain_train::NodeError::Forbidden(_)
                | blocktrain_train::NodeError::Unauthenticated(_)),
            ) if !announced => bail!("the registry at {url} refused this server: {e}"),
            Err(e) => eprintln!("warning: announcing to {url}: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// The blocking client, dropped on a thread of its own: dropping it inside an async
/// task (the announcer stopped by Ctrl-C) would panic.
struct OffRuntime(Option<Client>);

impl Drop for OffRuntime {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            std::thread::spawn(move || drop(c));
        }
    }
}

/// A server's passes and the milliseconds they took.
fn busy_of(i: &ServerInfo) -> (u64, Option<f64>) {
    (i.served, Some(i.busy_ms))
}
