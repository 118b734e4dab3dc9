//! The worker loop: register, then repeatedly lease a block, fetch its checkpoint
//! (cached, resumable, blake3-checked), train H local steps on this worker's shard, and
//! upload the delta (new - old) through the run's codec with error feedback.
//!
//! Every lease trains from fresh AdamW moments ([`train_delta`]): the update is then a
//! function of public inputs only (checkpoint, shard, lease), so the coordinator can
//! recompute a sampled one and compare (`verify`). DiLoCo keeps the moments across
//! rounds; we give that up for checkability. The learning rate follows the block's
//! schedule position given in the lease, not the worker's own step count, so a late
//! joiner trains at the rate the block is at. The codec's error-feedback residual does
//! stay with the worker while it keeps the same block.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blocktrain_model::data::Split;
use blocktrain_protocol::codec::{Codec, ErrorFeedback};
use blocktrain_protocol::wire::{DataShard, RegisterRequest, WorkReply, WorkerInfo, WIRE_VERSION};
use tch::Device;

use crate::client::Client;
use crate::coordinator::{short, RunInfo};
use crate::{io_err, NodeError, Result};

mod heartbeat;
mod host;
mod local;

use heartbeat::Heartbeat;
pub use host::{available_memory, load_or_create_key};
pub use local::{decode_checkpoint, shard_of, torch_rng, train_delta, LocalJob, Malice};

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Coordinator URL.
    pub coordinator: String,
    /// Key file (created on first run).
    pub key: PathBuf,
    /// Own training data; its bytes never leave this host.
    pub data: Option<PathBuf>,
    /// Checkpoint cache directory.
    pub cache: PathBuf,
    /// Training device.
    pub device: Device,
    /// The run's join secret, if it has one.
    pub join_secret: Option<String>,
    /// Stop after this many leases (None: until the run is done).
    pub max_leases: Option<usize>,
    /// Give up on an unreachable coordinator after this long.
    pub retry_for: Duration,
    /// Test only: tamper with every update before sending it (a malicious worker).
    pub malice: Option<Malice>,
}

/// What a worker did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerSummary {
    /// Updates accepted.
    pub accepted: usize,
    /// Updates refused (stale or rejected).
    pub refused: usize,
    /// Local steps trained.
    pub steps: i64,
    /// Bytes uploaded.
    pub bytes_up: u64,
    /// Bytes downloaded.
    pub bytes_down: u64,
}

/// The block this worker trains now and the codec residual it carries for it.
struct Current {
    block: usize,
    feedback: ErrorFeedback,
}

/// What a worker's own audit of the ledger found.
pub struct Audit {
    /// Its receipts whose inclusion proofs verified.
    pub receipts: usize,
    /// Of those, accepted.
    pub accepted: usize,
    /// Size of the tree head they were proven against.
    pub size: u64,
    /// Size of the earlier head this one was shown consistent with (None: first audit).
    pub consistent_with: Option<u64>,
}

impl std::fmt::Display for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} receipt(s) of mine ({} accepted) proven in the log of size {}",
            self.receipts, self.accepted, self.size
        )?;
        match self.consistent_with {
            Some(old) => write!(f, "; the log extends the one of size {old} I saw before"),
            None => write!(f, "; first head seen, kept for the next check"),
        }
    }
}

/// Checks, without trusting the coordinator, that every receipt it lists for this
/// worker is in its signed log (inclusion proofs), that the log only grew since the
/// head this worker last saw (consistency proof), and that the coordinator's key did
/// not change. The head is kept in `cache/ledger-head-<coordinator key>.json`.
pub fn audit_receipts(client: &mut Client, me: &str, cache: &Path) -> Result<Audit> {
    use blocktrain_protocol::receipt::{
        verify_consistency, ConsistencyProof, ReceiptProof, TreeHead,
    };
    let bad = |m: String| NodeError::Rejected(format!("ledger audit failed: {m}"));
    let listed: serde_json::Value = client.get_json(&format!("/v1/ledger/receipts?worker={me}"))?;
    let indices: Vec<u64> = listed["receipts"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["index"].as_u64()).collect())
        .unwrap_or_default();
    // One kept head per coordinator key, so joining another run starts a new record.
    let current: TreeHead = client.get_json("/v1/ledger/head")?;
    current
        .verify()
        .map_err(|e| bad(format!("tree head: {e}")))?;
    let tag: String = current.coordinator.chars().take(16).collect();
    let kept_path = cache.join(format!("ledger-head-{tag}.json"));
    let kept: Option<TreeHead> = std::fs::read(&kept_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let pinned = Some(current.coordinator.clone());
    let mut head: Option<TreeHead> = None;
    let mut accepted = 0;
    for i in &indices {
        let p: ReceiptProof = client.get_json(&format!("/v1/ledger/receipts/{i}"))?;
        p.verify(pinned.as_deref())
            .map_err(|e| bad(format!("receipt {i}: {e}")))?;
        if p.receipt.claim.worker != me {
            return Err(bad(format!("receipt {i} is not this worker's")));
        }
        accepted += usize::from(p.receipt.decision.accepted);
        head = Some(p.head);
    }
    let head = head.unwrap_or(current);
    head.verify().map_err(|e| bad(format!("tree head: {e}")))?;
    let consistent_with = match &kept {
        Some(old) if old.size <= head.size => {
            let proof: ConsistencyProof = client.get_json(&format!(
                "/v1/ledger/consistency?from={}&to={}",
                old.size, head.size
            ))?;
            verify_consistency(old, &head, &proof).map_err(|e| {
                bad(format!(
                    "the log of size {} does not extend the one of size {} seen before: {e}",
                    head.size, old.size
                ))
            })?;
            Some(old.size)
        }
        Some(old) => {
            return Err(bad(format!(
                "the log shrank from {} to {} entries",
                old.size, head.size
            )))
        }
        None => None,
    };
    std::fs::create_dir_all(cache).map_err(io_err(cache))?;
    let json = serde_json::to_vec(&head).expect("heads serialise");
    blocktrain_model::checkpoint::write_atomic(&kept_path, &json)?;
    Ok(Audit {
        receipts: indices.len(),
        accepted,
        size: head.size,
        consistent_with,
    })
}

/// Runs a worker until the run is done (or `max_leases`).
pub fn run(opts: &WorkerOptions) -> Result<WorkerSummary> {
    let id = load_or_create_key(&opts.key)?;
    let my_key = id.public_hex();
    let me = short(&my_key).to_string();
    let join_proof = opts
        .join_secret
        .as_ref()
        .map(|s| blocktrain_protocol::wire::join_proof(s, &id.public_hex()));
    let mut client = Client::new(&opts.coordinator, id)?;
    client.retry_for = opts.retry_for;

    let own: Option<Vec<u8>> = match &opts.data {
        Some(p) => Some(std::fs::read(p).map_err(io_err(p))?),
        None => None,
    };
    let mut info = WorkerInfo {
        wire_version: WIRE_VERSION,
        device: format!("{:?}", opts.device).to_lowercase(),
        memory_bytes: available_memory(),
        step_rate: None,
        data: own.as_ref().map(|b| DataShard {
            blake3: blake3::hash(b).to_hex().to_string(),
            bytes: b.len() as u64,
        }),
    };
    let run: RunInfo = client.post_json(
        "/v1/register",
        &RegisterRequest {
            info: info.clone(),
            join_proof,
        },
    )?;
    let manifest = run.manifest;
    manifest.validate()?;
    let codec = Codec::parse(&run.codec).map_err(|e| NodeError::Config(e.to_string()))?;
    let corpus = match own {
        Some(bytes) => bytes,
        None => manifest.plan.dataset.load(Split::Train)?,
    };
    eprintln!(
        "[worker {me}] joined {} ({} blocks, codec {}), training on {}",
        client.base(),
        manifest.parts.len(),
        run.codec,
        match &opts.data {
            Some(p) => format!(
                "own data {} ({} bytes, stays on this host)",
                p.display(),
                corpus.len()
            ),
            None => manifest.plan.dataset.describe(),
        }
    );

    let mut summary = WorkerSummary::default();
    let mut current: Option<Current> = None;
    let mut leases = 0;
    let mut refused_in_a_row = 0;
    loop {
        if opts.max_leases.is_some_and(|m| leases >= m) {
            break;
        }
        let lease = match client.post_json::<_, WorkReply>("/v1/work", &info)? {
            WorkReply::Done => {
                eprintln!("[worker {me}] run is done");
                match audit_receipts(&mut client, &my_key, &opts.cache) {
                    Ok(a) => eprintln!("[worker {me}] ledger: {a}"),
                    // A log that fails its proofs is the coordinator's fault, and the
                    // worker's record of it: say so loudly and fail.
                    Err(e @ NodeError::Rejected(_)) => return Err(e),
                    Err(e) => eprintln!("[worker {me}] ledger not checked: {e}"),
                }
                break;
            }
            WorkReply::Wait { retry_ms } => {
                std::thread::sleep(Duration::from_millis(retry_ms.clamp(50, 10_000)));
                continue;
            }
            WorkReply::Lease(l) => l,
        };
        leases += 1;
        // Heartbeats run for the whole lease: download, training and upload.
        let beat = Heartbeat::start(
            client.for_heartbeats(Duration::from_millis(lease.lease_ms / 3)),
            &lease,
        );
        let weights = client.checkpoint(&lease.weights_hash, &opts.cache)?;
        if current.as_ref().is_none_or(|c| c.block != lease.block) {
            current = Some(Current {
                block: lease.block,
                feedback: ErrorFeedback::default(),
            });
        }
        let cur = current.as_mut().expect("set above");
        // Served in the run's checkpoint codec; the delta is taken against exactly this base.
        let base = decode_checkpoint(&weights).map_err(|e| {
            NodeError::Rejected(format!("checkpoint {}: {e}", short(&lease.weights_hash)))
        })?;
        let t0 = Instant::now();
        let shard = match &opts.data {
            Some(_) => &corpus[..], // own data: all of it
            None => shard_of(
                &corpus,
                lease.shard_index,
                lease.shard_count,
                manifest.model.window,
            ),
        };
        let job = LocalJob {
            manifest: &manifest,
            block: lease.block,
            base: &base,
            lease: &lease,
            shard,
        };
        let Some((d, loss)) = train_delta(&job, opts.device, &|| beat.wanted())? else {
            eprintln!(
                "[worker {me}] block {} moved past version {}; dropping this lease",
                lease.block + 1,
                lease.version
            );
            current = None;
            continue;
        };
        let secs = t0.elapsed().as_secs_f64();
        info.step_rate = Some(lease.steps as f64 / secs.max(1e-6));
        let d = match opts.malice {
            Some(m) => m.apply(&d, lease.seed),
            None => d,
        };
        let body = cur.feedback.encode(&d, codec);
        summary.steps += lease.steps;
        let sent = client.upload_claimed(&lease, &body, loss, shard.len() as u64);
        drop(beat);
        match sent {
            Ok(r) => {
                summary.accepted += 1;
                refused_in_a_row = 0;
                eprintln!(
                    "[worker {me}] block {} v{}: {} steps in {secs:.1} s ({:.1} steps/s), loss {loss:.4}, sent {} KB {} -> accepted (block now v{})",
                    lease.block + 1,
                    lease.version,
                    lease.steps,
                    info.step_rate.unwrap_or(0.0),
                    body.len() / 1024,
                    run.codec,
                    r.block_version
                );
            }
            Err(e @ NodeError::Stale(_)) => {
                summary.refused += 1;
                cur.feedback = ErrorFeedback::default();
                eprintln!("[worker {me}] update refused: {e}");
            }
            Err(e @ (NodeError::Rejected(_) | NodeError::TooLarge(_))) => {
                summary.refused += 1;
                refused_in_a_row += 1;
                cur.feedback = ErrorFeedback::default();
                eprintln!("[worker {me}] update refused: {e}");
                if refused_in_a_row >= 3 {
                    return Err(NodeError::Rejected(format!(
                        "the coordinator refused 3 updates in a row; the last: {e}"
                    )));
                }
            }
            Err(e) => return Err(e),
        }
    }
    summary.bytes_up = client.bytes_up;
    summary.bytes_down = client.bytes_down;
    Ok(summary)
}
