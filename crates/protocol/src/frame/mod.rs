//! Inference frames: what block servers and clients send each other over TCP.
//!
//! A frame is a fixed 16-byte header, a JSON metadata part and a binary body:
//!
//! ```text
//! magic "BTIF" | version u16 LE | kind u8 | flags u8 (0) | meta_len u32 LE | body_len u32 LE
//! meta (JSON, meta_len bytes) | body (body_len bytes)
//! ```
//!
//! The header is checked before anything is allocated: magic, version, kind, flags and
//! both lengths against the receiver's limits. Decoding the rest is pure and total:
//! any byte string gives a [`Message`] or a [`ProtocolError`](crate::ProtocolError),
//! never a panic.
//!
//! Token sequences travel as bytes, not activations: one byte per position plus a
//! bitmap of positions still masked ([`encode_tokens`]). The embedding family's requests
//! ([`Message::Latent`]) also carry the latent z between stages: positions x width
//! values as f16, at the noise level sigma the previous stage stopped at.
//!
//! An AR session's setup may ask for log-probabilities ([`ArSetup::logprobs`]): its
//! last stage then answers each step with the model's [`ByteLogprobs`] for the sampled
//! byte and the most likely ones (at most [`MAX_TOP_LOGPROBS`]). Both fields are
//! optional, so peers from before them read and write the frames as they did.
//!
//! Every connection starts with the server's [`Greeting`] (what it hosts, its key, a
//! fresh challenge), sent before the server reads a byte: a caller checks it is talking
//! to a server of the right model before it sends anything, and a client authenticates
//! the connection once with a [`Hello`] signing that challenge.
//!
//! Files: `header` (layout, [`parse_header`]), `route` ([`BlockRange`], [`Stage`] and
//! the route limits), `message` (metadata and [`Message`]), `greeting` (the handshake),
//! `encoding` (bodies, encode and decode).
mod encoding;
mod greeting;
mod header;
mod message;
mod route;

pub use encoding::{decode_frame, decode_tokens, encode_tokens};
pub use greeting::{hello_message, Greeting, Hello, CHALLENGE_HEX};
pub use header::{
    parse_header, Header, Kind, DEFAULT_MAX_FRAME, FRAME_VERSION, HEADER_LEN, MAGIC, MAX_META,
};
pub use message::{
    ArOutput, ArPayload, ArSetup, ArStepMeta, ByteLogprobs, DenoiseMeta, ErrorCode, HopError,
    HopStat, LatentState, Message, ResultMeta, Sampling, ServerInfo, MASK_TOKEN, MAX_TOP_LOGPROBS,
};
pub use route::{BlockRange, Stage, MAX_BLOCK, MAX_REPLICAS, MAX_STAGES};

#[cfg(test)]
mod tests;
