//! `blocktrain gateway`: an OpenAI-compatible HTTP server (completions, chat completions,
//! models, health, metrics) in front of a route of block servers.
use std::net::SocketAddr;

use anyhow::{Context, Result};
use blocktrain_serve::{client, openai};
use clap::Args;

/// Flags of `blocktrain gateway`.
#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Block servers: a file with one host:port per line, or a comma-separated list.
    #[arg(long, required_unless_present = "registry")]
    pub route: Option<String>,
    /// Or build the route from a coordinator's server registry (rebuilt every
    /// --refresh seconds, and kept when a rebuild fails).
    #[command(flatten)]
    pub registry: crate::cmd::registry::RegistryClientArgs,
    /// With --registry: seconds between rebuilds of the route from the live list.
    #[arg(long, default_value_t = 15.0)]
    pub refresh: f64,
    /// This gateway's key, for block servers that authenticate their clients.
    #[command(flatten)]
    pub client_key: crate::args::ClientKeyArgs,
    /// HTTP address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Denoising steps per block when a request does not say (the judge's choice on
    /// valid, docs/RESULTS.md 8b).
    #[arg(long, default_value_t = blocktrain_model::sampler::DEFAULT_STEPS_PER_BLOCK as u32)]
    pub steps_per_block: u32,
    /// Seconds of silence after which a server is given up on.
    #[arg(long, default_value_t = 10.0)]
    pub stall_timeout: f64,
    /// Requests that may generate at once; more are answered 503 (retry) at once.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent: usize,
    /// Let browser pages from ORIGIN call the gateway (CORS; preflights answered).
    /// Repeatable; `*` allows any origin. Without it no CORS headers are sent.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
}

/// Rebuilds the route from the registry every `every`: servers that joined are used,
/// expired ones dropped, replicas re-ranked by their latest load. The model stays the
/// one the gateway started with (its clients asked for it by name); a failed rebuild
/// keeps the route it has.
async fn refresh_forever(
    mut registry: crate::cmd::registry::RegistryClientArgs,
    limits: blocktrain_serve::hop::HopLimits,
    shared: openai::SharedPlan,
    every: std::time::Duration,
) {
    let model = shared
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .model_id
        .clone();
    registry.model = Some(model);
    loop {
        tokio::time::sleep(every).await;
        match crate::cmd::registry::plan(&registry, &limits).await {
            Ok(plan) => {
                *shared.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(plan)
            }
            Err(e) => eprintln!("warning: route not refreshed from the registry (kept): {e:#}"),
        }
    }
}

/// Runs the gateway until Ctrl-C.
pub fn run(args: GatewayArgs) -> Result<()> {
    crate::cmd::coordinator::init_logging();
    let limits = args
        .client_key
        .apply(crate::cmd::serve::limits(args.stall_timeout, 5.0, 16)?)?;
    let servers = args.route.as_deref().map(client::load_route).transpose()?;
    if !(args.refresh.is_finite() && args.refresh >= 1.0) {
        anyhow::bail!("--refresh must be at least 1 second");
    }
    let options = openai::GatewayOptions {
        default_steps: args.steps_per_block,
        max_concurrent: args.max_concurrent,
        cors_origins: args.cors_origins,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let plan = match &servers {
            Some(servers) => client::discover(servers, &limits).await?,
            None => crate::cmd::registry::plan(&args.registry, &limits).await?,
        };
        for u in &plan.unreachable {
            eprintln!("warning: left out of the route: {u}");
        }
        let (model, stages) = (plan.model_id.clone(), plan.stages.len());
        let shared = openai::shared_plan(plan);
        if servers.is_none() {
            tokio::spawn(refresh_forever(
                args.registry.clone(),
                limits.clone(),
                shared.clone(),
                std::time::Duration::from_secs_f64(args.refresh),
            ));
        }
        let app = openai::router_shared(shared, limits, options)?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        // One line, the completions URL last: scripts and tests read it.
        println!(
            "gateway for model {model} ({stages} stages) on http://{}/v1/completions",
            listener.local_addr()?
        );
        tokio::select! {
            r = axum::serve(listener, app) => r?,
            _ = tokio::signal::ctrl_c() => eprintln!("stopping"),
        }
        Ok(())
    })
}
