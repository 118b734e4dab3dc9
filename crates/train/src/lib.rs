//! BlockTrain's training over the network: the coordinator and its workers.
//!
//! - [`core`]: the coordinator's decisions (assignment, leases, lapses, one decided
//!   upload per lease, round readiness, stalls) as a pure state machine: in memory,
//!   time passed in, no I/O; unit-tested without a database or libtorch.
//! - [`coordinator`]: the shell around the core: SQLite ([`store`]) as its journal,
//!   checkpoints as content-addressed files, vetting, merges and receipts; tested with
//!   an explicit clock.
//! - [`server`]: the coordinator's HTTP API (axum): signature checks, body limits,
//!   `/v1/status`, `/metrics`.
//! - [`dashboard`]: the web page the server shows at `/` (blocks, held-out CE chart,
//!   bytes moved, receipts), polling the JSON API; self-contained, works offline.
//! - [`registry`]: block servers' announcements (soft state, bounded) and their
//!   coverage of each model's blocks, for clients building routes.
//! - [`worker`]: register, lease, download, train H steps, upload the delta, repeat.
//! - [`client`]: signed HTTP requests with retries and resumable downloads.
//! - [`tls`]: HTTPS for the coordinator (certificates, self-signed, pinning).
//! - [`merge`]: the outer step (DiLoCo Nesterov or plain averaging) on dense `f32`
//!   arrays, with robust (median, trimmed-mean) merge rules.
//! - [`verify`]: checks of an update before it is merged: a deterministic recompute
//!   (spot check) and a held-out screen on fixed draws.
//! - [`local_train`]: a lease's training as a pure function of its inputs, which the
//!   worker runs and the spot check reruns; [`keys`]: identity key files; [`run_info`]:
//!   what a registering worker is told. Shared by worker and coordinator, which import
//!   these and not each other.
//!
//! Compute comes from `blocktrain-model`, wire formats from `blocktrain-protocol`.
//! Serving (block servers and their client) is `blocktrain-serve`, which needs none of
//! this crate.
#![deny(missing_docs)]

pub mod client;
pub mod config;
pub mod coordinator;
pub mod core;
pub mod dashboard;
pub mod keys;
pub mod ledger;
pub mod local_train;
pub mod merge;
pub mod moments;
pub mod registry;
pub mod run_info;
pub mod server;
pub mod store;
pub mod tensors;
pub mod tls;
pub mod trust;
pub mod verify;
pub mod worker;

/// Errors of a node, each mapped to one HTTP status by the server.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad run configuration or command-line value.
    #[error("{0}")]
    Config(String),
    /// Missing, bad or unknown signature/key.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Authenticated, but not allowed.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// No such lease, blob or block.
    #[error("not found: {0}")]
    NotFound(String),
    /// The update was for a version the block has left.
    #[error("stale: {0}")]
    Stale(String),
    /// An update that was read and refused (shape, NaN, norm, codec).
    #[error("rejected: {0}")]
    Rejected(String),
    /// A body over the size limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The caller is over its rate limit.
    #[error("rate limited: {0}")]
    RateLimited(String),
    /// A bounded resource is full for now (not the caller's fault alone).
    #[error("busy: {0}")]
    Busy(String),
    /// The peer could not be reached or answered badly.
    #[error("{0}")]
    Network(String),
    /// Model or checkpoint trouble.
    #[error(transparent)]
    Model(#[from] blocktrain_model::ModelError),
    /// Durable state trouble.
    #[error("state database: {0}")]
    Db(#[from] rusqlite::Error),
    /// File system trouble, with the path.
    #[error("{path}: {error}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error (shown in the message, so not chained again).
        error: std::io::Error,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, NodeError>;

/// Milliseconds since the Unix epoch (the clock signed requests and leases use).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The first 12 characters of a key or hash, for messages.
/// Peer input may be any UTF-8, so the cut is made at a character boundary (a byte
/// index could land inside a character and panic).
pub fn short(s: &str) -> &str {
    match s.char_indices().nth(12) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |error| NodeError::Io {
        path: path.display().to_string(),
        error,
    }
}
