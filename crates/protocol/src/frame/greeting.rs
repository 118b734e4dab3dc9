//! The connection handshake: the server's [`Greeting`] and the client's [`Hello`].
//!
//! A server greets every connection before it reads a byte, so a caller (a client, or a
//! server about to forward) learns what the address hosts without sending it anything:
//! an address that does not greet as a server of the right model never sees a request.
//!
//! Authentication is per connection, so a pooled connection pays for it once: the
//! greeting carries a fresh random challenge, and the client's `Hello` signs (challenge,
//! server key) with its ed25519 key. A `Hello` is good for the connection whose challenge
//! it signs and no other, so a captured one cannot be replayed elsewhere; no clocks are
//! involved. (There is no channel binding: a server in the middle of a connection can
//! relay it, as without TLS any hop can. Run routes over a private network or a tunnel
//! when that matters.)
use serde::{Deserialize, Serialize};

use super::message::ServerInfo;
use crate::identity::{verify, Identity};
use crate::wire::{is_hex64, join_proof};
use crate::{ProtocolError, Result};

/// Hex digits of a greeting's challenge (16 random bytes).
pub const CHALLENGE_HEX: usize = 32;

/// A server's first frame on a connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Greeting {
    /// What it hosts (as an `Info` answer).
    pub info: ServerInfo,
    /// Its public key, hex: what a `Hello` signs for.
    pub key: String,
    /// Fresh for this connection: what a `Hello` signs.
    pub challenge: String,
    /// Whether it serves requests only after a valid `Hello`.
    pub auth: bool,
    /// It closes a connection idle for this long (a pool drops idle ones well before).
    pub idle_timeout_ms: u64,
    /// Connections it has accepted since it started, this one included (counted by the
    /// server, so a test can measure how many connections a pool opened).
    pub connections: u64,
}

/// A client's authentication of one connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's public key, 64 lowercase hex digits (one spelling per key).
    pub key: String,
    /// With a join secret: `wire::join_proof(secret, key)`.
    #[serde(default)]
    pub join_proof: Option<String>,
    /// Signature of [`hello_message`] by `key`, hex.
    pub sig: String,
}

/// The bytes a `Hello` signs: the domain, the server's key and the connection's challenge.
pub fn hello_message(challenge: &str, server_key: &str) -> Vec<u8> {
    format!("blocktrain-hello-v1\n{server_key}\n{challenge}").into_bytes()
}

impl Hello {
    /// Answers `greeting` as `id` (with the join proof of `join_secret`, if any).
    pub fn sign(id: &Identity, greeting: &Greeting, join_secret: Option<&str>) -> Hello {
        let key = id.public_hex();
        Hello {
            join_proof: join_secret.map(|s| join_proof(s, &key)),
            sig: hex::encode(id.sign(&hello_message(&greeting.challenge, &greeting.key))),
            key,
        }
    }

    /// Checks the signature against this connection's `challenge` and the server's key.
    pub fn verify(&self, challenge: &str, server_key: &str) -> Result<()> {
        verify(&self.key, &hello_message(challenge, server_key), &self.sig)
    }

    /// Sizes and spellings, checked when the frame is decoded (before any crypto).
    pub(super) fn check_shape(&self) -> Result<()> {
        let hex_of = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !is_hex64(&self.key) {
            return Err(ProtocolError::Unauthenticated(
                "a Hello's key must be 64 lowercase hex digits".into(),
            ));
        }
        if !hex_of(&self.sig, 128) {
            return Err(ProtocolError::Unauthenticated(
                "a Hello's signature must be 128 lowercase hex digits".into(),
            ));
        }
        if self.join_proof.as_deref().is_some_and(|p| !is_hex64(p)) {
            return Err(ProtocolError::Unauthenticated(
                "a Hello's join proof must be 64 lowercase hex digits".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_frame, BlockRange, Message, DEFAULT_MAX_FRAME};

    fn greeting(key: &str, challenge: &str) -> Greeting {
        Greeting {
            info: ServerInfo {
                model_id: "m".into(),
                family: "block".into(),
                blocks: BlockRange::new(1, 2).unwrap(),
                total: 2,
                max_tokens: 64,
                d_model: 16,
                window: 32,
                served: 0,
                busy_ms: 0.0,
                batches: 0,
                batched: 0,
            },
            key: key.into(),
            challenge: challenge.into(),
            auth: true,
            idle_timeout_ms: 300_000,
            connections: 1,
        }
    }

    #[test]
    fn a_hello_verifies_only_for_its_challenge_and_server() {
        let (client, server) = (Identity::generate(), Identity::generate());
        let g = greeting(&server.public_hex(), &"ab".repeat(16));
        let h = Hello::sign(&client, &g, Some("s3cret"));
        h.verify(&g.challenge, &g.key).unwrap();
        // Another connection's challenge, or another server's key: refused.
        assert!(h.verify(&"cd".repeat(16), &g.key).is_err());
        assert!(h.verify(&g.challenge, &client.public_hex()).is_err());
        let mut forged = h.clone();
        forged.key = Identity::generate().public_hex();
        assert!(forged.verify(&g.challenge, &g.key).is_err());
        assert_eq!(
            h.join_proof.as_deref(),
            Some(join_proof("s3cret", &h.key).as_str())
        );
        // Both frames round-trip; a Hello of the wrong shape is refused at decoding.
        for m in [Message::Greeting(g), Message::Hello(h.clone())] {
            assert_eq!(decode_frame(&m.encode(), DEFAULT_MAX_FRAME).unwrap(), m);
        }
        let mut upper = h;
        upper.key = upper.key.to_uppercase();
        let e = decode_frame(&Message::Hello(upper).encode(), DEFAULT_MAX_FRAME).unwrap_err();
        assert!(e.to_string().contains("lowercase"), "{e}");
    }
}
