//! Signed HTTP requests. The signature covers method, path, timestamp, a nonce and the
//! blake3 of the raw body, so the receiver verifies the exact bytes before decoding any
//! of them (as Psyche's `signed_message` does), and a replayed or re-targeted request
//! fails.
use crate::identity::{verify, Identity};
use crate::{ProtocolError, Result};

/// Header carrying the signer's public key (hex).
pub const KEY_HEADER: &str = "x-bt-key";
/// Header carrying the Unix timestamp in milliseconds.
pub const TIME_HEADER: &str = "x-bt-time";
/// Header carrying a random nonce (hex).
pub const NONCE_HEADER: &str = "x-bt-nonce";
/// Header carrying the signature (hex).
pub const SIG_HEADER: &str = "x-bt-sig";

/// The authentication headers of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Auth {
    /// Signer's public key, hex.
    pub key: String,
    /// Unix time of signing, ms.
    pub time_ms: u64,
    /// Random nonce, hex.
    pub nonce: String,
    /// Signature, hex.
    pub sig: String,
}

fn message(method: &str, path: &str, time_ms: u64, nonce: &str, body: &[u8]) -> Vec<u8> {
    format!(
        "blocktrain-request-v1\n{method}\n{path}\n{time_ms}\n{nonce}\n{}",
        blake3::hash(body).to_hex()
    )
    .into_bytes()
}

/// Signs a request.
pub fn sign(id: &Identity, method: &str, path: &str, time_ms: u64, body: &[u8]) -> Auth {
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let sig = hex::encode(id.sign(&message(method, path, time_ms, &nonce, body)));
    Auth {
        key: id.public_hex(),
        time_ms,
        nonce,
        sig,
    }
}

/// Verifies a request against its raw body; `now_ms` and `max_skew_ms` bound its age.
/// (Nonce reuse within the window is the receiver's to track.)
pub fn verify_request(
    auth: &Auth,
    method: &str,
    path: &str,
    body: &[u8],
    now_ms: u64,
    max_skew_ms: u64,
) -> Result<()> {
    if auth.time_ms.abs_diff(now_ms) > max_skew_ms {
        return Err(ProtocolError::Unauthenticated(format!(
            "request time is {} ms from ours (limit {max_skew_ms} ms): check the clock",
            auth.time_ms.abs_diff(now_ms)
        )));
    }
    verify(
        &auth.key,
        &message(method, path, auth.time_ms, &auth.nonce, body),
        &auth.sig,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_request_verifies_only_as_sent() {
        let id = Identity::generate();
        let a = sign(&id, "POST", "/v1/update", 1_000, b"body");
        verify_request(&a, "POST", "/v1/update", b"body", 1_500, 60_000).unwrap();
        assert!(verify_request(&a, "POST", "/v1/update", b"bodY", 1_500, 60_000).is_err());
        assert!(verify_request(&a, "POST", "/v1/other", b"body", 1_500, 60_000).is_err());
        assert!(verify_request(&a, "GET", "/v1/update", b"body", 1_500, 60_000).is_err());
        let stale = verify_request(&a, "POST", "/v1/update", b"body", 100_000, 60_000).unwrap_err();
        assert!(stale.to_string().contains("clock"));
        let mut forged = a.clone();
        forged.key = Identity::generate().public_hex();
        assert!(verify_request(&forged, "POST", "/v1/update", b"body", 1_500, 60_000).is_err());
    }
}
