//! Request authentication: the signature headers, the signature over the raw bytes,
//! the request's age and its nonce. Nothing here takes the coordinator's lock.
use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::{HeaderMap, Method, Uri};
use blocktrain_protocol::signed::{self, Auth};

use super::Reply;
use crate::{now_ms, NodeError};

/// What request checks need, kept apart from the coordinator's lock so that async code
/// never waits on a merge.
#[derive(Debug)]
pub struct Gate {
    pub(super) skew_ms: u64,
    pub(super) started_ms: u64,
    pub(super) max_update: usize,
    pub(super) nonces: Mutex<HashMap<String, u64>>,
}

impl Gate {
    /// Remembers a nonce; false if seen within the skew window (a replay).
    fn fresh(&self, key: &str, nonce: &str, now: u64) -> bool {
        let mut n = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        if n.len() > 10_000 {
            let window = 2 * self.skew_ms;
            n.retain(|_, t| now.saturating_sub(*t) < window);
        }
        n.insert(format!("{key}/{nonce}"), now).is_none()
    }
}

pub(super) fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The signature headers, parsed; the key must be lowercase hex so that one key has one
/// spelling (the nonce cache and the allowlist compare strings).
pub(super) fn auth_headers(headers: &HeaderMap) -> Reply<Auth> {
    let missing = |h: &str| {
        NodeError::Unauthenticated(format!(
            "request is not signed (no {h} header): workers sign every request with their key"
        ))
    };
    let key = header(headers, signed::KEY_HEADER).ok_or_else(|| missing(signed::KEY_HEADER))?;
    if key.len() != 64
        || !key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(NodeError::Unauthenticated(
            "x-bt-key must be a public key of 64 lowercase hex digits".into(),
        ));
    }
    Ok(Auth {
        key: key.to_string(),
        time_ms: header(headers, signed::TIME_HEADER)
            .ok_or_else(|| missing(signed::TIME_HEADER))?
            .parse()
            .map_err(|_| NodeError::Unauthenticated("x-bt-time is not a number".into()))?,
        nonce: header(headers, signed::NONCE_HEADER)
            .ok_or_else(|| missing(signed::NONCE_HEADER))?
            .to_string(),
        sig: header(headers, signed::SIG_HEADER)
            .ok_or_else(|| missing(signed::SIG_HEADER))?
            .to_string(),
    })
}

/// Checks a request's signature (over method, path with query, time, nonce, body), its
/// age and its nonce; returns the signer's key. Requests signed before this process
/// started are refused, so a restart does not reopen the replay window (clients re-sign
/// when they retry).
pub(super) fn authenticate(
    gate: &Gate,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Reply<String> {
    let auth = auth_headers(headers)?;
    let now = now_ms();
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    signed::verify_request(&auth, method.as_str(), path, body, now, gate.skew_ms).map_err(|e| {
        NodeError::Unauthenticated(match e {
            blocktrain_protocol::ProtocolError::Unauthenticated(m) => m,
            other => other.to_string(),
        })
    })?;
    if auth.time_ms + 1000 < gate.started_ms {
        return Err(NodeError::Unauthenticated(
            "request signed before this coordinator started; sign it again".into(),
        ));
    }
    if !gate.fresh(&auth.key, &auth.nonce, now) {
        return Err(NodeError::Unauthenticated(
            "replayed request (nonce already used)".into(),
        ));
    }
    Ok(auth.key)
}
