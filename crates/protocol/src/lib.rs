//! What crosses the wire between BlockTrain nodes, and nothing that moves it.
//!
//! - [`identity`]: ed25519 node identities (a worker's persistent key).
//! - [`signed`]: request signatures over the raw body bytes (verify, then decode).
//! - [`wire`]: the JSON bodies of worker <-> coordinator requests.
//! - [`codec`]: block updates (deltas) as safetensors bytes, compressed to fp16, int8 with
//!   per-chunk scales (and error feedback), or top-k; decoding checks every name, shape
//!   and size against what the receiver expects before allocating.
//! - [`receipt`]: training receipts (a worker's signed claim, the coordinator's signed
//!   decision) and the signed heads, inclusion and consistency proofs of their
//!   append-only Merkle log (RFC 6962 via `ct-merkle`).
//! - [`registry`]: block servers' announcements to a coordinator, and the live list
//!   clients build routes from.
//! - [`frame`]: inference frames between block servers and clients over TCP
//!   (length-prefixed, versioned, size-capped; tokens as bytes + a mask bitmap).
//!
//! This crate does no I/O and knows no tensors library: tensors cross it as bytes and
//! `f32` slices, so it builds and fuzzes in seconds.
#![deny(missing_docs)]

pub mod codec;
pub mod frame;
pub mod identity;
pub mod receipt;
pub mod registry;
pub mod signed;
pub mod wire;

/// Errors a peer's bytes can cause; each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Bytes that do not parse.
    #[error("malformed: {0}")]
    Malformed(String),
    /// Well-formed but not what the receiver expects (names, shapes, sizes, versions).
    #[error("rejected: {0}")]
    Rejected(String),
    /// Bad or missing signature, unknown key, stale timestamp.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ProtocolError>;

/// One host, as per-address limits count it: an IPv4 address, or an IPv6 /64 (what one
/// host is usually given); a v4-mapped IPv6 address is its IPv4 one.
pub fn host_of(ip: std::net::IpAddr) -> String {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        v4 => v4.to_string(),
    }
}
