//! The worker loop: register, then repeatedly lease a block, fetch its checkpoint
//! (cached, resumable, blake3-checked), train H local steps on this worker's shard, and
//! upload the delta (new - old) through the run's codec with error feedback.
//!
//! A lease starts from the AdamW moments the coordinator serves with the checkpoint
//! (`[training] optimizer_state = "carry"`, the default: [`crate::moments`]) or from
//! zero moments (`"fresh"`), never from state only this worker has: the update is then
//! a function of public inputs only (checkpoint, shard, lease), so the coordinator can
//! recompute a sampled one and compare (`verify`). The learning rate follows the block's
//! schedule position given in the lease, not the worker's own step count, so a late
//! joiner trains at the rate the block is at. The codec's error-feedback residual does
//! stay with the worker while it keeps the same block.
//!
//! A refused update does not end the worker: it backs off ([`Backoff`]) and asks for
//! work again, since an honest update can be refused (a held-out screen's false
//! positive). Only a definitive refusal ends it: barred or not admitted (403), not
//! authenticated (401), a wire version or memory the coordinator cannot use.
//!
//! Each key keeps its own record under the cache directory ([`Record`]): checkpoints,
//! the coordinator's pinned key, the last ledger head checked, and a journal of its
//! uploads. However the loop ends after registering (the run done, `max_leases`, a stop
//! request, a refusal or an error), the worker then audits the coordinator's ledger
//! against that record ([`audit_receipts`]).
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blocktrain_model::data::Split;
use blocktrain_protocol::codec::{Codec, ErrorFeedback};
use blocktrain_protocol::receipt::TreeHead;
use blocktrain_protocol::wire::{DataShard, RegisterRequest, WorkReply, WorkerInfo, WIRE_VERSION};
use rand::SeedableRng;
use tch::Device;

use crate::client::{content_prefix, Client};
use crate::run_info::RunInfo;
use crate::{io_err, NodeError, Result};

mod audit;
mod backoff;
mod heartbeat;
mod host;
mod malice;
mod outcome;
mod participation;
mod record;

pub use audit::{audit_receipts, Audit, Seen};
pub use backoff::{Backoff, WARN_AFTER};
use heartbeat::Heartbeat;
pub use host::available_memory;
pub use malice::Malice;
use participation::Pacer;
pub use participation::Participation;
// What a worker trains with and its key file, also here (their homes are shared with
// the coordinator, which must not import the worker).
pub use crate::keys::load_or_create_key;
pub use crate::local_train::{
    decode_checkpoint, shard_of, torch_rng, train_delta, LocalJob, Trained,
};
pub use record::{key_dir, Record, Upload, KEY_TAG_LEN};

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

/// What a caller controls in a running worker besides its options.
#[derive(Clone, Debug, Default)]
pub struct Control {
    /// Set to stop: the worker drops its lease at the next step, audits the ledger and
    /// returns (a request in flight finishes or runs out its retries first).
    pub stop: Arc<AtomicBool>,
    /// The waits after refused updates.
    pub backoff: Backoff,
    /// Missed rounds and slowdown (measurements only; the default takes part fully).
    pub participation: Participation,
}

/// Runs a worker until the run is done (or `max_leases`); see [`Control::run`].
pub fn run(opts: &WorkerOptions) -> Result<WorkerSummary> {
    Control::default().run(opts)
}

/// How long the audit after a lost coordinator keeps trying: it was just unreachable
/// for `retry_for`, so the audit only checks whether it is back.
const AUDIT_RETRY_AFTER_NETWORK_ERROR: Duration = Duration::from_secs(10);

impl Control {
    /// Runs a worker until the run is done, `max_leases`, a definitive refusal, an
    /// error, or `stop`; then, whichever it was, audits the coordinator's ledger against
    /// this key's record. The work's own error comes first; an audit that fails its
    /// checks turns a finished run into an error, and one that could not reach the
    /// ledger is logged.
    pub fn run(&self, opts: &WorkerOptions) -> Result<WorkerSummary> {
        run_with(self, opts)
    }
}

fn run_with(ctl: &Control, opts: &WorkerOptions) -> Result<WorkerSummary> {
    let id = load_or_create_key(&opts.key)?;
    let my_key = id.public_hex();
    let join_proof = opts
        .join_secret
        .as_ref()
        .map(|s| blocktrain_protocol::wire::join_proof(s, &id.public_hex()));
    let mut client = Client::with_trust(&opts.coordinator, id, &opts.tls)?;
    client.retry_for = opts.retry_for;

    let mut w = Session {
        ctl,
        opts,
        me: content_prefix(&my_key, 12),
        record: Record::open(&opts.cache, &my_key)?,
        client,
        seen: Seen::default(),
        summary: WorkerSummary::default(),
        admitted: false,
        rng: rand::rngs::StdRng::from_os_rng(),
    };
    let worked = w.work(join_proof);
    w.summary.bytes_up = w.client.bytes_up;
    w.summary.bytes_down = w.client.bytes_down;
    if !w.admitted {
        // Nothing of this run to check: the coordinator would not have us, was never
        // reached, or is not the one this record is about. The record waits for the
        // next audit.
        return worked.map(|()| w.summary);
    }
    if matches!(worked, Err(NodeError::Network(_))) {
        w.client.retry_for = w.client.retry_for.min(AUDIT_RETRY_AFTER_NETWORK_ERROR);
    }
    let me = &w.me;
    let audit = audit_receipts(&mut w.client, &my_key, &w.record, &w.seen);
    match (&worked, audit) {
        (_, Ok(a)) => eprintln!("[worker {me}] ledger: {a}"),
        // A log that fails its checks is the coordinator's fault and this worker's
        // record of it: say so loudly, and fail a run that otherwise went well.
        (Ok(()), Err(e @ NodeError::Rejected(_))) => return Err(e),
        (Err(_), Err(NodeError::Rejected(m))) => eprintln!("[worker {me}] {m}"),
        (_, Err(e)) => eprintln!("[worker {me}] ledger not checked: {e}"),
    }
    worked.map(|()| w.summary)
}

/// One worker's run: its client, record and what it saw.
struct Session<'a> {
    ctl: &'a Control,
    opts: &'a WorkerOptions,
    /// The key's first hex digits, for log lines.
    me: String,
    record: Record,
    client: Client,
    seen: Seen,
    summary: WorkerSummary,
    /// Whether the coordinator admitted us and is the one we know (from then on, every
    /// exit is audited).
    admitted: bool,
    /// Backoff jitter.
    rng: rand::rngs::StdRng,
}

impl Session<'_> {
    fn stopping(&self) -> bool {
        self.ctl.stop.load(Ordering::Relaxed)
    }

    /// Sleeps `d`, or less if asked to stop.
    fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopping() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    /// Pins the coordinator's key on first contact, or refuses a changed one, before
    /// doing any work for it. An empty ledger has no head yet: the first audit pins.
    fn check_coordinator_key(&mut self) -> Result<()> {
        match self.client.get_json::<TreeHead>("/v1/ledger/head") {
            Ok(head) => {
                head.verify().map_err(|e| {
                    NodeError::Rejected(format!("the coordinator's tree head does not verify: {e}"))
                })?;
                self.record.pin(&head.coordinator, self.client.base())
            }
            Err(NodeError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn work(&mut self, join_proof: Option<String>) -> Result<()> {
        let opts = self.opts;
        let me = self.me.clone();
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
        let run: RunInfo = self.client.post_json(
            "/v1/register",
            &RegisterRequest {
                info: info.clone(),
                join_proof,
            },
        )?;
        self.check_coordinator_key()?;
        self.admitted = true;
        let manifest = run.manifest;
        manifest.validate()?;
        let codec = Codec::parse(&run.codec).map_err(|e| NodeError::Config(e.to_string()))?;
        let corpus = match own {
            Some(bytes) => bytes,
            None => manifest.plan.dataset.load(Split::Train)?,
        };
        eprintln!(
            "[worker {me}] joined {} ({} blocks, codec {}), training on {}",
            self.client.base(),
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

        self.ctl.participation.validate()?;
        let mut pacer = Pacer::new(self.ctl.participation, &self.me);
        let mut last_lease: Option<Duration> = None;
        let mut current: Option<Current> = None;
        // The run's corpus, for a worker with its own data: loaded for its first check
        // lease (`Lease::public_shard`).
        let mut public: Option<Vec<u8>> = None;
        let mut leases = 0;
        let mut refused_in_a_row = 0u32;
        // A wait owed after a refusal: served before asking again, not before leaving.
        let mut backoff: Option<Duration> = None;
        loop {
            if self.stopping() {
                eprintln!("[worker {me}] stopping as asked");
                return Ok(());
            }
            if opts.max_leases.is_some_and(|m| leases >= m) {
                return Ok(());
            }
            if let Some(wait) = backoff.take() {
                self.sleep(wait);
                continue;
            }
            // One draw per lease delivered, none per wait or back-off (Pacer::away).
            if let Some(away) = pacer.away(last_lease.take()) {
                eprintln!(
                    "[worker {me}] missing a round: away for {:.1} s (participation test)",
                    away.as_secs_f64()
                );
                self.sleep(away);
            }
            let lease = match self.client.post_json::<_, WorkReply>("/v1/work", &info)? {
                WorkReply::Done => {
                    eprintln!("[worker {me}] run is done");
                    self.seen.done = true;
                    return Ok(());
                }
                WorkReply::Wait { retry_ms } => {
                    self.sleep(Duration::from_millis(retry_ms.clamp(50, 10_000)));
                    continue;
                }
                WorkReply::Lease(l) => l,
            };
            leases += 1;
            let lease_started = Instant::now();
            self.seen.saw(lease.block as u32, lease.version);
            // Heartbeats run for the whole lease: download, training and upload.
            let beat = Heartbeat::start(
                self.client
                    .for_heartbeats(Duration::from_millis(lease.lease_ms / 3)),
                &lease,
            );
            let weights = self
                .client
                .checkpoint(&lease.weights_hash, self.record.dir())?;
            if current.as_ref().is_none_or(|c| c.block != lease.block) {
                current = Some(Current {
                    block: lease.block,
                    feedback: ErrorFeedback::default(),
                });
            }
            let cur = current.as_mut().expect("set above");
            // Served in the run's checkpoint codec; the delta is taken against exactly this base.
            let state = decode_checkpoint(&weights).map_err(|e| {
                NodeError::Rejected(format!(
                    "checkpoint {}: {e}",
                    content_prefix(&lease.weights_hash, 12)
                ))
            })?;
            // A run that carries optimizer state serves the moments to start from in the
            // same file (none yet at version 0: zero moments).
            let (base, moments) = crate::moments::split(state);
            let moments = (lease.carry_moments && !moments.is_empty()).then_some(moments);
            let t0 = Instant::now();
            if opts.data.is_some() && lease.public_shard && public.is_none() {
                public = Some(manifest.plan.dataset.load(Split::Train)?);
            }
            let shard = match (&opts.data, &public) {
                // A check lease: the run's shard, which the coordinator can recompute.
                (Some(_), Some(public)) if lease.public_shard => shard_of(
                    public,
                    lease.shard_index,
                    lease.shard_count,
                    manifest.model.window,
                ),
                (Some(_), _) => &corpus[..], // own data: all of it
                (None, _) => shard_of(
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
                moments: moments.as_ref(),
            };
            let stop = &self.ctl.stop;
            pacer.new_lease();
            let keep_going = || {
                pacer.step_boundary();
                beat.wanted() && !stop.load(Ordering::Relaxed)
            };
            let trained = train_delta(&job, opts.device, &keep_going)?;
            if trained.is_some() {
                pacer.step_boundary(); // the last step is paced like the others
            }
            let Some(trained) = trained else {
                if !self.stopping() {
                    eprintln!(
                        "[worker {me}] block {} moved past version {}; dropping this lease",
                        lease.block + 1,
                        lease.version
                    );
                }
                current = None;
                continue;
            };
            let loss = trained.loss;
            let d = trained.update(&job);
            let secs = t0.elapsed().as_secs_f64();
            info.step_rate = Some(lease.steps as f64 / secs.max(1e-6));
            let d = match opts.malice {
                Some(m) => m.apply(&d, lease.seed),
                None => d,
            };
            let body = cur.feedback.encode(&d, codec);
            self.summary.steps += lease.steps;
            let sent = self
                .client
                .upload_claimed(&lease, &body, loss, shard.len() as u64);
            drop(beat);
            last_lease = Some(lease_started.elapsed());
            self.note_upload(&lease, &body, &sent)?;
            match sent {
                Ok(r) => {
                    self.summary.accepted += 1;
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
                // The round moved on while we trained: normal, ask for new work now.
                Err(e @ NodeError::Stale(_)) => {
                    self.summary.refused += 1;
                    cur.feedback = ErrorFeedback::default();
                    eprintln!("[worker {me}] update refused: {e}");
                }
                Err(
                    e @ (NodeError::Rejected(_) | NodeError::TooLarge(_) | NodeError::NotFound(_)),
                ) => {
                    self.summary.refused += 1;
                    refused_in_a_row += 1;
                    cur.feedback = ErrorFeedback::default();
                    backoff = Some(self.back_off(refused_in_a_row, &e));
                }
                // Barred (403), not trusted (401), or the coordinator is gone: definitive.
                Err(e) => return Err(e),
            }
        }
    }
}

/// The block this worker trains now and the codec residual it carries for it.
struct Current {
    block: usize,
    feedback: ErrorFeedback,
}
