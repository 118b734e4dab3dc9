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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blocktrain_model::data::{Split, WindowSampler};
use blocktrain_model::run::Manifest;
use blocktrain_model::trainer::Trainer;
use blocktrain_protocol::codec::{self, Arrays, Codec, ErrorFeedback};
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::wire::{
    DataShard, HeartbeatReply, Lease, RegisterRequest, WorkReply, WorkerInfo, WIRE_VERSION,
};
use tch::{Device, Kind};

use crate::client::Client;
use crate::coordinator::{short, RunInfo};
use crate::tensors::{delta, to_arrays};
use crate::{io_err, NodeError, Result};

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
    /// Which certificates an https:// coordinator may present (default: public roots).
    pub tls: crate::tls::TlsTrust,
}

/// How a malicious test worker tampers with its updates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Malice {
    /// Sends -delta.
    Flip,
    /// Sends k x delta.
    Scale(f32),
    /// Sends Gaussian noise with each tensor's RMS.
    Random,
}

impl std::str::FromStr for Malice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "flip" => Ok(Malice::Flip),
            "random" => Ok(Malice::Random),
            _ => s
                .strip_prefix("scale:")
                .and_then(|k| k.parse().ok())
                .map(Malice::Scale)
                .ok_or_else(|| format!("malice must be flip, random or scale:K, got {s:?}")),
        }
    }
}

impl Malice {
    /// The tampered version of `delta`.
    pub fn apply(self, delta: &Arrays, seed: u64) -> Arrays {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        delta
            .iter()
            .map(|(name, a)| {
                let rms = crate::merge::rms(a) as f32;
                let data = a
                    .data
                    .iter()
                    .map(|&v| match self {
                        Malice::Flip => -v,
                        Malice::Scale(k) => k * v,
                        Malice::Random => {
                            // Box-Muller: a normal draw scaled to the tensor's RMS.
                            let (u1, u2): (f32, f32) =
                                (rng.random::<f32>().max(1e-9), rng.random());
                            rms * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                        }
                    })
                    .collect();
                (
                    name.clone(),
                    blocktrain_protocol::codec::Array {
                        shape: a.shape.clone(),
                        data,
                    },
                )
            })
            .collect()
    }
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

/// Loads the worker's identity, creating it (mode 0600) on first use.
pub fn load_or_create_key(path: &Path) -> Result<Identity> {
    if path.exists() {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let text = String::from_utf8_lossy(&bytes);
        let secret = hex::decode(text.trim())
            .map_err(|_| NodeError::Config(format!("{}: not a hex key file", path.display())))?;
        return Identity::from_secret(&secret)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())));
    }
    let id = Identity::generate();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(io_err(path))?;
    std::io::Write::write_all(&mut f, format!("{}\n", hex::encode(id.secret())).as_bytes())
        .map_err(io_err(path))?;
    eprintln!(
        "created key {} (public {})",
        path.display(),
        id.public_hex()
    );
    Ok(id)
}

/// MemAvailable from /proc/meminfo, bytes (0 when unknown).
pub fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
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
    let mut client = Client::with_trust(&opts.coordinator, id, &opts.tls)?;
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

/// Keeps a lease alive from a background thread while it is held (download, training,
/// upload); `wanted()` turns false once the coordinator says the round moved on.
struct Heartbeat {
    stop: Arc<AtomicBool>,
    wanted: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(mut client: Client, lease: &Lease) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let wanted = Arc::new(AtomicBool::new(true));
        let every = Duration::from_millis(lease.lease_ms / 3).max(Duration::from_millis(100));
        let path = format!("/v1/leases/{}/heartbeat", lease.id);
        let (s, w) = (stop.clone(), wanted.clone());
        let thread = std::thread::spawn(move || {
            let mut last = Instant::now();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if last.elapsed() < every {
                    continue;
                }
                last = Instant::now();
                match client.post_empty::<HeartbeatReply>(&path) {
                    Ok(r) if !r.still_wanted => {
                        w.store(false, Ordering::Relaxed);
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("heartbeat failed ({e}); the lease may lapse"),
                }
            }
        });
        Heartbeat {
            stop,
            wanted,
            thread: Some(thread),
        }
    }

    fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Relaxed)
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Everything a lease's local training depends on: the worker and a checking
/// coordinator build the same job and get the same update.
#[derive(Clone, Copy, Debug)]
pub struct LocalJob<'a> {
    /// The run (block shapes, objectives, inner optimizer).
    pub manifest: &'a Manifest,
    /// Block index, 0-based.
    pub block: usize,
    /// Start weights: the checkpoint exactly as the worker decoded it
    /// ([`decode_checkpoint`] of the served bytes), not the coordinator's fp32 master.
    pub base: &'a Arrays,
    /// Steps, batch, seed and schedule position.
    pub lease: &'a Lease,
    /// The bytes windows are drawn from ([`shard_of`] of the run's train split, or a
    /// worker's own data).
    pub shard: &'a [u8],
}

/// Trains `job` from fresh AdamW moments and returns (delta = trained - base, mean
/// training loss), or None once `keep_going()` turns false (checked before each step).
///
/// Step i of H' local steps sits at `schedule_step + i * span / H'` of the block's LR
/// schedule; windows come from a sampler seeded by the lease seed and the masks of step
/// i from `seed + i`, so nothing depends on the caller's history. Bit-identical results
/// need the same inputs on the same device type, libtorch build and intra-op thread
/// count (CPU reductions split by thread); across thread counts the results differ
/// by float rounding only (see `verify`). Holds [`torch_rng`] around every draw.
pub fn train_delta(
    job: &LocalJob,
    device: Device,
    keep_going: &dyn Fn() -> bool,
) -> Result<Option<(Arrays, f64)>> {
    let LocalJob {
        manifest,
        block,
        base,
        lease,
        shard,
    } = *job;
    let state = manifest.parts.get(block).ok_or_else(|| {
        NodeError::Rejected(format!(
            "lease names block {} of {}",
            block + 1,
            manifest.parts.len()
        ))
    })?;
    let mut trainer = {
        let _rng = torch_rng(); // Trainer::new seeds the global generator
        Trainer::new(
            &manifest.part_model(block),
            state.objective,
            manifest.optim.clone(),
            device,
            lease.seed as i64,
        )?
    };
    trainer.load_weights(&codec::encode(base, Codec::Fp32))?;
    let mut sampler = WindowSampler::new(shard, manifest.model.window, lease.seed, device)?;
    let mut loss_sum = tch::Tensor::zeros([], (Kind::Float, device));
    let span = lease.schedule_span.max(1);
    for i in 0..lease.steps {
        if !keep_going() {
            return Ok(None);
        }
        let x = sampler.next_batch(lease.batch);
        let pos = lease.schedule_step + i * span / lease.steps.max(1);
        let lr = trainer.optim.lr_at(pos, lease.schedule_total);
        let noise_seed = (lease.seed as i64).wrapping_add(i);
        let _rng = torch_rng();
        loss_sum += trainer.train_step_with(&x, lr, noise_seed);
    }
    let loss = loss_sum.double_value(&[]) / lease.steps.max(1) as f64;
    Ok(Some((delta(&to_arrays(&trainer.weights())?, base), loss)))
}

/// A served checkpoint's weights (safetensors in the run's checkpoint codec), decoded
/// against the shapes its own header declares.
pub fn decode_checkpoint(bytes: &[u8]) -> blocktrain_protocol::Result<Arrays> {
    let shapes = codec::header_shapes(bytes)?;
    Ok(codec::decode(bytes, &shapes, usize::MAX)?.0)
}

/// Serialises use of libtorch's process-wide random generator: a step seeds it and then
/// draws its masks, and another thread seeding in between (a second trainer, a
/// coordinator's check) would change those draws. Everything in this crate that seeds
/// libtorch holds this while it seeds and draws.
pub fn torch_rng() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Slice `index` of `count` equal slices of `corpus` (the whole corpus when a slice
/// would be two windows or less): the bytes a lease's shard fields name.
pub fn shard_of(corpus: &[u8], index: u32, count: u32, window: i64) -> &[u8] {
    let count = count.max(1) as usize;
    let len = corpus.len() / count;
    if len <= 2 * window as usize {
        return corpus;
    }
    let start = (index as usize % count) * len;
    &corpus[start..start + len]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_disjoint_slices() {
        let c: Vec<u8> = (0..100).collect();
        assert_eq!(shard_of(&c, 0, 2, 4), &c[..50]);
        assert_eq!(shard_of(&c, 1, 2, 4), &c[50..]);
        assert_eq!(shard_of(&c, 3, 2, 4), &c[50..]);
        assert_eq!(shard_of(&c, 0, 2, 40).len(), 100, "too small to split");
    }

    #[test]
    fn key_file_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k/worker.key");
        let a = load_or_create_key(&p).unwrap();
        let b = load_or_create_key(&p).unwrap();
        assert_eq!(a.public_hex(), b.public_hex());
        std::fs::write(&p, "nothex").unwrap();
        assert!(load_or_create_key(&p)
            .unwrap_err()
            .to_string()
            .contains("hex"));
    }
}
