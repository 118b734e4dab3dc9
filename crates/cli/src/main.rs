//! `blocktrain`: train, evaluate and sample block-local byte diffusion models.
//!
//! Each subcommand lives in `cmd/<name>.rs`; shared flag groups and presets in
//! `args.rs` and `profile.rs`.
mod args;
mod cmd;
mod profile;
mod progress;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "blocktrain",
    version,
    about = "Decentralized block-local training of byte diffusion models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole system on loopback: a coordinator and workers train every block on the
    /// shipped data, then evaluate and print a sample.
    Demo(cmd::demo::DemoArgs),
    /// Run a training coordinator: hands out blocks, merges updates, serves checkpoints.
    Coordinator(cmd::coordinator::CoordinatorArgs),
    /// Run a training worker: lease a block, train it locally, upload the update, repeat.
    Worker(cmd::worker::WorkerArgs),
    /// An emulated WAN link (delay, bandwidth): a TCP proxy for tests and benchmarks.
    Link(cmd::link::LinkArgs),
    /// Train a block-local model on this machine alone (all blocks or one), or a reference.
    Train(cmd::train::TrainArgs),
    /// Held-out ELBO (or exact NLL for AR) on WikiText-2 valid/test, with standard errors.
    Eval(cmd::eval::EvalArgs),
    /// Sample bytes from a trained model: one pass through the block stack, locally
    /// (--checkpoint) or across block servers (--route).
    Generate(cmd::generate::GenerateArgs),
    /// Check this node before it joins: memory, disk, the coordinator, clock skew, whether
    /// its public address is reachable, and its peers.
    Doctor(cmd::doctor::DoctorArgs),
    /// A local network (coordinator, workers, block servers) that trains and serves under
    /// seeded fault injection, then checks its invariants.
    Testnet(cmd::testnet::TestnetArgs),
    /// Serve some blocks of a model to clients and other block servers over TCP.
    Serve(cmd::serve::ServeArgs),
    /// OpenAI-style HTTP entry point (POST /v1/completions) in front of block servers.
    Gateway(cmd::gateway::GatewayArgs),
    /// Sample quality under one AR judge: each generator's samples scored by their NLL
    /// per byte, with their byte-unigram entropy, beside real held-out text.
    Judge(cmd::judge::JudgeArgs),
    /// Equal-ELBO-share interval boundaries from a trained pilot run.
    Boundaries(cmd::boundaries::BoundariesArgs),
    /// Training receipts, offline: verify a coordinator's ledger, prove and check one
    /// receipt's inclusion, export them, total them per worker for payouts.
    #[command(subcommand)]
    Ledger(cmd::ledger::LedgerCommand),
    /// Benchmarks that print a table and write JSON.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Coordinator(a) => cmd::coordinator::run(a),
        Command::Worker(a) => cmd::worker::run(a),
        Command::Link(a) => cmd::link::run(&a),
        Command::Train(a) => cmd::train::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Doctor(a) => cmd::doctor::run(a),
        Command::Testnet(a) => cmd::testnet::run(a),
        Command::Gateway(a) => cmd::gateway::run(a),
        Command::Judge(a) => cmd::judge::run(a),
        Command::Boundaries(a) => cmd::boundaries::run(a),
        Command::Ledger(c) => cmd::ledger::run(c),
        Command::Bench(c) => cmd::bench::run(c),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
