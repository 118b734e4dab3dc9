//! BlockTrain's serving role: inference across hosts, block servers and their client.
//!
//! Serving depends on the model and the wire formats only (`blocktrain-model`,
//! `blocktrain-protocol`), never on the training side (coordinator, SQLite, ledger), so
//! a block server links none of it.
//!
//! - [`hosted`]: the model side of a server (its blocks, or AR layers + KV cache).
//! - [`server`]: TCP server; runs its blocks and forwards bytes to the next stage.
//! - [`hop`]: calling a stage, replica after replica, with connect and stall timeouts.
//! - [`rank`]: orders each stage's replicas by measured latency and load (routes built
//!   from a registry).
//! - [`client`]: discovers what servers host, builds the route, sends requests.
//! - [`openai`]: an OpenAI-compatible HTTP gateway (completions, chat, models, health,
//!   metrics) in front of a route.
//! - [`budget`]: a server's byte budget for the frames it holds.
//! - [`framed`]: frames ([`blocktrain_protocol::frame`]) on async streams.
#![deny(missing_docs)]

use blocktrain_protocol::frame::Message;

mod error;

pub(crate) use error::{io_err, now_ms};
pub use error::{Result, ServeError};

pub mod budget;
pub mod client;
pub mod framed;
pub mod hop;
pub mod hosted;
pub mod openai;
pub mod rank;
pub mod server;

/// A frame's kind in words, for error messages.
pub(crate) fn kind_name(m: &Message) -> &'static str {
    match m {
        Message::Info => "Info",
        Message::Greeting(_) => "Greeting",
        Message::Hello(_) => "Hello",
        Message::ServerInfo(_) => "ServerInfo",
        Message::Denoise(..) => "Denoise",
        Message::Keepalive => "Keepalive",
        Message::Result(..) => "Result",
        Message::Error(_) => "Error",
        Message::ArStep(..) => "ArStep",
        Message::ArOutput(_) => "ArOutput",
        Message::Latent(..) => "Latent",
    }
}
