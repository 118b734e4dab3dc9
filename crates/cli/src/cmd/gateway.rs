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
    #[arg(long)]
    pub route: String,
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

/// Runs the gateway until Ctrl-C.
pub fn run(args: GatewayArgs) -> Result<()> {
    crate::cmd::coordinator::init_logging();
    let limits = crate::cmd::serve::limits(args.stall_timeout, 5.0, 16)?;
    let servers = client::load_route(&args.route)?;
    let options = openai::GatewayOptions {
        default_steps: args.steps_per_block,
        max_concurrent: args.max_concurrent,
        cors_origins: args.cors_origins,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let plan = client::discover(&servers, &limits).await?;
        for u in &plan.unreachable {
            eprintln!("warning: left out of the route: {u}");
        }
        let (model, stages) = (plan.model_id.clone(), plan.stages.len());
        let app = openai::router(plan, limits, options)?;
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
