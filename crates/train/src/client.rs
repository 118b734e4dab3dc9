//! A worker's signed HTTP client: every request carries the worker's signature, network
//! failures and 5xx replies are retried with exponential backoff (with a message saying
//! what is unreachable), 4xx replies become typed errors, and checkpoint downloads
//! resume from where they stopped and are checked against their blake3 before use.
//! An https:// coordinator is trusted as a [`TlsTrust`] says; TLS failures (an
//! untrusted certificate, a pin mismatch) are not retried.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blocktrain_model::checkpoint::content_hash;
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::signed;
use blocktrain_protocol::wire::ErrorBody;
use reqwest::blocking::{Client as Http, Response};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::tls::{tls_failure, TlsTrust};
use crate::{io_err, now_ms, NodeError, Result};

/// A signed client for one coordinator.
pub struct Client {
    base: String,
    id: Identity,
    http: Http,
    /// Give up on an unreachable coordinator after this long.
    pub retry_for: Duration,
    /// Bytes this client uploaded (request bodies).
    pub bytes_up: u64,
    /// Bytes this client downloaded (checkpoint bodies).
    pub bytes_down: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.base)
    }
}

fn status_error(status: StatusCode, body: &str) -> NodeError {
    let msg = serde_json::from_str::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| {
            format!(
                "HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            )
        });
    // The coordinator's message already names its kind ("stale: ..."); keep it as is.
    let strip = |m: &str, p: &str| m.strip_prefix(p).unwrap_or(m).to_string();
    match status {
        StatusCode::UNAUTHORIZED => NodeError::Unauthenticated(strip(&msg, "unauthenticated: ")),
        StatusCode::FORBIDDEN => NodeError::Forbidden(strip(&msg, "forbidden: ")),
        StatusCode::NOT_FOUND => NodeError::NotFound(strip(&msg, "not found: ")),
        StatusCode::CONFLICT => NodeError::Stale(strip(&msg, "stale: ")),
        StatusCode::PAYLOAD_TOO_LARGE => NodeError::TooLarge(strip(&msg, "too large: ")),
        _ => NodeError::Rejected(strip(&msg, "rejected: ")),
    }
}

impl Client {
    /// A client for the coordinator at `base` (e.g. `http://10.0.0.1:7700`), trusting
    /// the public CA roots for an https:// one.
    pub fn new(base: &str, id: Identity) -> Result<Self> {
        Client::with_trust(base, id, &TlsTrust::default())
    }

    /// A client for the coordinator at `base` that accepts the certificates `trust`
    /// says (a pinned fingerprint or a private CA for an https:// coordinator).
    pub fn with_trust(base: &str, id: Identity, trust: &TlsTrust) -> Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(NodeError::Config(format!(
                "coordinator URL '{base}' must start with http:// or https://"
            )));
        }
        // A pin on a plaintext URL would protect nothing while looking as if it did.
        if base.starts_with("http://") && !trust.is_default() {
            return Err(NodeError::Config(format!(
                "TLS trust ({}) was given, but the coordinator URL '{base}' is plain http://: use https://",
                trust.describe()
            )));
        }
        // No whole-request timeout on the client: transfers of large blocks over slow
        // links take long. Each request sets its own (see `attempt`).
        let http = trust
            .configure(Http::builder())?
            .connect_timeout(Duration::from_secs(10))
            .timeout(None)
            .build()
            .map_err(|e| NodeError::Network(e.to_string()))?;
        Ok(Client {
            base,
            id,
            http,
            retry_for: Duration::from_secs(600),
            bytes_up: 0,
            bytes_down: 0,
        })
    }

    /// The coordinator URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A copy for a heartbeat thread: same key and coordinator, short retry budget.
    pub fn for_heartbeats(&self, retry_for: Duration) -> Client {
        Client {
            base: self.base.clone(),
            id: self.id.clone(),
            http: self.http.clone(),
            retry_for,
            bytes_up: 0,
            bytes_down: 0,
        }
    }

    /// One signed attempt. The signature covers the path with its query string. Small
    /// requests time out after 2 minutes, bodies get 10 s more per MB (100 KB/s),
    /// downloads an hour.
    fn attempt(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        extra: &[(&str, String)],
    ) -> reqwest::Result<Response> {
        let auth = signed::sign(&self.id, method, path, now_ms(), body);
        let timeout = if path.starts_with("/v1/blobs/") {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(120 + body.len() as u64 / 100_000)
        };
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.http.get(url),
            _ => self.http.post(url).body(body.to_vec()),
        };
        req = req
            .timeout(timeout)
            .header(signed::KEY_HEADER, auth.key)
            .header(signed::TIME_HEADER, auth.time_ms.to_string())
            .header(signed::NONCE_HEADER, auth.nonce)
            .header(signed::SIG_HEADER, auth.sig);
        for (k, v) in extra {
            req = req.header(*k, v);
        }
        req.send()
    }

    /// Sends with retries on network errors and 5xx; returns a 2xx response or the
    /// typed error of a 4xx.
    fn send(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        extra: &[(&str, String)],
    ) -> Result<Response> {
        let start = Instant::now();
        let mut wait = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            let problem = match self.attempt(method, path, body, extra) {
                Ok(r) if r.status().is_success() => {
                    self.bytes_up += body.len() as u64;
                    return Ok(r);
                }
                Ok(r) if r.status().is_client_error() => {
                    self.bytes_up += body.len() as u64;
                    let status = r.status();
                    return Err(status_error(status, &r.text().unwrap_or_default()));
                }
                Ok(r) => format!("coordinator at {} answered {}", self.base, r.status()),
                // A certificate that is not trusted, or a peer that does not speak TLS,
                // stays so: fail now with the reason instead of retrying for minutes.
                Err(e) if tls_failure(&e).is_some() => {
                    return Err(NodeError::Network(format!(
                        "TLS with the coordinator at {} failed: {}",
                        self.base,
                        tls_failure(&e).unwrap_or_default()
                    )))
                }
                Err(e) => format!(
                    "cannot reach coordinator at {}: {}",
                    self.base,
                    root_cause(&e)
                ),
            };
            // At least a second attempt: one slow attempt (a busy coordinator's vetting
            // queue) can outlast retry_for by itself. Uploads are safe to resend (the
            // same bytes on the same lease get the first reply).
            if start.elapsed() >= self.retry_for && attempt >= 2 {
                return Err(NodeError::Network(format!(
                    "{problem}; gave up after {attempt} attempts over {:.0} s",
                    start.elapsed().as_secs_f64()
                )));
            }
            eprintln!(
                "{problem}; retrying in {:.1} s (attempt {attempt})",
                wait.as_secs_f64()
            );
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(5));
            attempt += 1;
        }
    }

    /// Signed JSON POST.
    pub fn post_json<T: Serialize, R: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &T,
    ) -> Result<R> {
        let bytes = serde_json::to_vec(body).expect("request serialises");
        let r = self.send("POST", path, &bytes, &[])?;
        r.json()
            .map_err(|e| NodeError::Network(format!("{path}: bad reply: {e}")))
    }

    /// Signed POST with an empty body.
    pub fn post_empty<R: DeserializeOwned>(&mut self, path: &str) -> Result<R> {
        let r = self.send("POST", path, b"", &[])?;
        r.json()
            .map_err(|e| NodeError::Network(format!("{path}: bad reply: {e}")))
    }

    /// Signed GET of JSON.
    pub fn get_json<R: DeserializeOwned>(&mut self, path: &str) -> Result<R> {
        let r = self.send("GET", path, b"", &[])?;
        r.json()
            .map_err(|e| NodeError::Network(format!("{path}: bad reply: {e}")))
    }

    /// Uploads an update with this worker's signed claim about it (what goes into the
    /// coordinator's ledger as its side of the receipt).
    pub fn upload_claimed(
        &mut self,
        lease: &blocktrain_protocol::wire::Lease,
        body: &[u8],
        loss: f64,
        data_bytes: u64,
    ) -> Result<blocktrain_protocol::wire::UpdateReply> {
        let claim = blocktrain_protocol::receipt::Claim {
            version: blocktrain_protocol::receipt::RECEIPT_VERSION,
            worker: self.id.public_hex(),
            lease: lease.id,
            block: lease.block as u32,
            base_version: lease.version,
            update_blake3: content_hash(body),
            steps: lease.steps,
            data_bytes,
            local_loss: loss.is_finite().then_some(loss),
        };
        let sig = claim.sign(&self.id);
        let json = serde_json::to_vec(&claim).expect("claims serialise");
        let path = format!("/v1/updates/{}?loss={loss}", lease.id);
        let extra = [
            ("x-blocktrain-claim", hex::encode(json)),
            ("x-blocktrain-claim-sig", sig),
        ];
        let r = self.send("POST", &path, body, &extra)?;
        r.json()
            .map_err(|e| NodeError::Network(format!("{path}: bad reply: {e}")))
    }

    /// The checkpoint with blake3 `hash`: from `cache` if there, else downloaded into
    /// `cache/<hash>.partial` (resuming a previous partial download with an HTTP Range
    /// request), checked, and renamed into place. `hash` comes from the coordinator and
    /// names files here, so it is refused unless it is a blake3 hash ([`check_blake3_hex`]).
    pub fn checkpoint(&mut self, hash: &str, cache: &Path) -> Result<Vec<u8>> {
        check_blake3_hex("checkpoint", hash)?;
        let short = content_prefix(hash, 12);
        std::fs::create_dir_all(cache).map_err(io_err(cache))?;
        let done = cache.join(format!("{hash}.safetensors"));
        if let Ok(bytes) = std::fs::read(&done) {
            if content_hash(&bytes) == hash {
                return Ok(bytes);
            }
            let _ = std::fs::remove_file(&done); // corrupt cache entry: fetch again
        }
        // Per-worker partial name: workers sharing a cache never write one file; the
        // finished file is renamed into place atomically.
        let partial: PathBuf = cache.join(format!(
            "{hash}.{}.partial",
            content_prefix(&self.id.public_hex(), 12)
        ));
        let path = format!("/v1/blobs/{hash}");
        let mut failures = 0;
        while failures < 3 {
            let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            let extra: Vec<(&str, String)> = if have > 0 {
                vec![("range", format!("bytes={have}-"))]
            } else {
                vec![]
            };
            let mut r = match self.send("GET", &path, b"", &extra) {
                Ok(r) => r,
                // The partial file is already whole (killed before the rename) or longer
                // than the blob: start over.
                Err(NodeError::Rejected(m)) if have > 0 && m.contains("416") => {
                    let _ = std::fs::remove_file(&partial);
                    failures += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let resumed = r.status() == StatusCode::PARTIAL_CONTENT;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(resumed)
                .write(true)
                .truncate(!resumed)
                .open(&partial)
                .map_err(io_err(&partial))?;
            let copied = std::io::copy(&mut r, &mut file);
            file.flush().map_err(io_err(&partial))?;
            let got = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            let fresh = got.saturating_sub(if resumed { have } else { 0 });
            self.bytes_down += fresh;
            if let Err(e) = copied {
                // Keep going as long as each attempt makes progress.
                failures = if fresh > 0 { 0 } else { failures + 1 };
                eprintln!("download of {short} interrupted at {got} bytes ({e}); resuming");
                continue;
            }
            let bytes = std::fs::read(&partial).map_err(io_err(&partial))?;
            if content_hash(&bytes) == hash {
                std::fs::rename(&partial, &done).map_err(io_err(&done))?;
                prune_cache(cache, CACHE_KEEP);
                return Ok(bytes);
            }
            let _ = std::fs::remove_file(&partial);
            failures += 1;
            eprintln!("checkpoint {short} failed its blake3 check; downloading again");
        }
        Err(NodeError::Network(format!(
            "checkpoint {short} could not be downloaded intact (3 failed attempts without progress)"
        )))
    }
}

/// Checks that `hash`, which the coordinator named as the blake3 of `what`, is one as
/// this build writes them: exactly 64 lowercase hex digits. Such a hash becomes part of
/// a file name and a URL, so anything else (a path like `../x`, a short or non-ASCII
/// string) is refused before any use, with what was given (escaped and shortened).
pub fn check_blake3_hex(what: &str, hash: &str) -> Result<()> {
    if hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Ok(());
    }
    let shown = content_prefix(hash, 80);
    let more = if shown.len() < hash.len() { "..." } else { "" };
    Err(NodeError::Rejected(format!(
        "the coordinator named {what} {shown:?}{more}, which is not a blake3 hash \
         (64 lowercase hex digits); refusing to use it"
    )))
}

/// The first `n` characters of `s`, for log lines. Counted in characters, so it cannot
/// split one (byte slicing a peer's string can panic).
pub fn content_prefix(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Checkpoints a worker's cache keeps (the newest by modification time).
pub const CACHE_KEEP: usize = 4;

/// Removes all but the `keep` newest finished checkpoints in `cache` (best effort: a
/// file another worker sharing the cache still reads is re-downloaded if needed).
pub fn prune_cache(cache: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (_, p) in files.into_iter().skip(keep) {
        let _ = std::fs::remove_file(p);
    }
}

fn root_cause(e: &reqwest::Error) -> String {
    let mut src: &dyn std::error::Error = e;
    while let Some(s) = src.source() {
        src = s;
    }
    src.to_string()
}
