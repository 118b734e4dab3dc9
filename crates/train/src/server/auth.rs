//! Request authentication: the signature headers, the signature over the raw bytes,
//! the request's age and its nonce. Nothing here takes the coordinator's lock.
use std::sync::Mutex;

use axum::http::{HeaderMap, Method, Uri};
use blocktrain_protocol::signed::{self, Auth};

use super::limits::{Nonce, NonceCache, RateLimiter};
use super::Reply;
use crate::{now_ms, NodeError};

/// What request checks need, kept apart from the coordinator's lock so that async code
/// never waits on a merge.
#[derive(Debug)]
pub struct Gate {
    pub(super) skew_ms: u64,
    pub(super) started_ms: u64,
    pub(super) max_update: usize,
    nonces: Mutex<NonceCache>,
    /// Per signing key: every signed request.
    keys: Mutex<RateLimiter>,
    /// Per address: the unauthenticated reads (status, metrics, ledger).
    peers: Mutex<RateLimiter>,
    /// Per signing key: `/v1/probe` dials out, so it gets a rate of its own.
    probes: Mutex<RateLimiter>,
}

/// Most nonces remembered at once (16 bytes each plus bookkeeping: about 100 MB).
const MAX_NONCES: usize = 2_000_000;
/// Signed requests per key per second, and the burst: a worker makes a few a second at
/// most (work, heartbeats, checkpoint ranges).
const KEY_RATE: (f64, f64) = (50.0, 100.0);
/// Unauthenticated reads per address per second, and the burst (dashboards poll; a
/// read is a copy of the last snapshot or one page of receipts).
const PEER_RATE: (f64, f64) = (500.0, 1000.0);
/// Probes per key: one every 10 s, bursts of 3.
const PROBE_RATE: (f64, f64) = (0.1, 3.0);
/// Callers each limiter tracks at once.
const MAX_CALLERS: usize = 50_000;

/// A nonce is 16 to 64 characters of [0-9A-Za-z_-] (clients send 32 hex digits): an
/// empty or unbounded one is refused before it is remembered.
fn valid_nonce(n: &str) -> bool {
    (16..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Gate {
    /// Checks for a coordinator that started at `started_ms`, allowing `skew_ms` of
    /// clock difference, with uploads up to `max_update` bytes.
    pub fn new(skew_ms: u64, started_ms: u64, max_update: usize) -> Self {
        let limiter =
            |(rate, burst): (f64, f64)| Mutex::new(RateLimiter::new(rate, burst, MAX_CALLERS));
        Gate {
            skew_ms,
            started_ms,
            max_update,
            nonces: Mutex::new(NonceCache::new(2 * skew_ms.max(1), MAX_NONCES)),
            keys: limiter(KEY_RATE),
            peers: limiter(PEER_RATE),
            probes: limiter(PROBE_RATE),
        }
    }

    /// Remembers a nonce; an error if it was seen within the window (a replay) or the
    /// cache is full.
    fn fresh(&self, key: &str, nonce: &str, now: u64) -> Reply<()> {
        let mut n = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        match n.admit(key, nonce, now) {
            Nonce::Fresh => Ok(()),
            Nonce::Replayed => Err(NodeError::Unauthenticated(
                "replayed request (nonce already used)".into(),
            )),
            Nonce::Full => Err(NodeError::Busy(
                "too many requests in the replay window; try again shortly".into(),
            )),
        }
    }

    fn limit(limiter: &Mutex<RateLimiter>, caller: &str, what: &str) -> Reply<()> {
        let mut l = limiter.lock().unwrap_or_else(|p| p.into_inner());
        if l.allow(caller, now_ms()) {
            Ok(())
        } else {
            Err(NodeError::RateLimited(format!(
                "{what}: too many requests; slow down"
            )))
        }
    }

    /// The unauthenticated-read rate of `addr`.
    pub(super) fn limit_peer(&self, addr: &str) -> Reply<()> {
        Self::limit(&self.peers, addr, "reads from this address")
    }

    /// The probe rate of `key`.
    pub(super) fn limit_probe(&self, key: &str) -> Reply<()> {
        Self::limit(&self.probes, key, "probes from this key")
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
            .ok_or_else(|| missing(signed::NONCE_HEADER))
            .and_then(|n| match valid_nonce(n) {
                true => Ok(n.to_string()),
                false => Err(NodeError::Unauthenticated(
                    "x-bt-nonce must be 16 to 64 characters of [0-9A-Za-z_-]".into(),
                )),
            })?,
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
    // The rate first: a flood from one key is refused before it fills the nonce cache.
    Gate::limit(&gate.keys, &auth.key, "signed requests from this key")?;
    gate.fresh(&auth.key, &auth.nonce, now)?;
    Ok(auth.key)
}

/// A signed POST's key and its JSON body: the signature over the raw bytes is checked
/// first ([`authenticate`]), and only then is the body parsed; `what` names the body in
/// the error.
pub(super) fn signed_json<T: serde::de::DeserializeOwned>(
    gate: &Gate,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    what: &str,
) -> Reply<(String, T)> {
    let key = authenticate(gate, &Method::POST, uri, headers, body)?;
    let value = serde_json::from_slice(body)
        .map_err(|e| NodeError::Rejected(format!("{what} body: {e}")))?;
    Ok((key, value))
}
