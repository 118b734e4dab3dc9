//! Batching: diffusion requests for this server's blocks are computed together.
//!
//! One compute thread per server takes the admitted requests in arrival order. When it
//! starts a batch, the oldest waiting request's [`BatchKey`] (length, steps per block,
//! edm's Heun) picks the batch: every waiting request of that key joins, and more may
//! arrive for up to `window` after the batch began gathering, up to `max_batch`. So the
//! requests that arrive while a batch computes make the next one, and requests of
//! another key wait for their own (the oldest request is always next: none starves).
//! The batch runs through [`Hosted::denoise_batch`]: only the network's forward
//! passes are shared, every request keeps its own random draws, so a request's output
//! does not depend on what it was batched with. A request alone runs the unbatched
//! [`Hosted::denoise`].
//!
//! Bounds: every waiting request holds one of the gate's in-flight places (taken
//! before it is queued), so the queue is at most `--max-inflight` long, and a batch is
//! at most `max_batch` requests of one length. A panic in a batch's compute is caught
//! and the batch's requests are computed again one by one, so a request that panics
//! the compute fails alone. AR steps are not batched (each is one position of one
//! session's KV cache); they share the hosted networks' lock with this thread.
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::hosted::{BatchKey, DenoiseJob, DenoiseOut, Hosted};

/// Most requests `max_batch` may allow in one batch.
pub const MAX_BATCH_LIMIT: usize = 256;

/// How a block server batches diffusion requests.
#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// Most requests computed in one batch; 1 computes each request alone.
    pub max_batch: usize,
    /// How long a batch waits for more requests of its key after it begins gathering
    /// (requests already waiting join at once). Zero: only those already waiting.
    pub window: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        // 1 ms: measured in crates/serve/tests/batching.rs (the ignored bench): enough
        // for concurrent clients' next requests to meet again in one batch, a small
        // part of any real model's pass (see ARCHITECTURE.md).
        BatchOptions {
            max_batch: 8,
            window: Duration::from_millis(1),
        }
    }
}

/// What the compute thread has done, for `ServerInfo`.
#[derive(Debug, Default)]
pub(super) struct BatchStats {
    /// Batches computed (a request computed alone is a batch of one).
    pub(super) batches: AtomicU64,
    /// Requests those batches computed.
    pub(super) requests: AtomicU64,
}

/// A request's result, or why the compute itself failed (a panic: the server's fault).
pub(super) type Computed = Result<DenoiseOut, String>;

struct Queued {
    key: BatchKey,
    job: DenoiseJob,
    reply: oneshot::Sender<Computed>,
}

/// The server's side of the compute thread: hands it requests.
pub(super) struct Batcher {
    queue: mpsc::Sender<Queued>,
    /// Whether Heun's steps change the network's evaluations (the embedding family).
    latent: bool,
    pub(super) stats: Arc<BatchStats>,
}

impl Batcher {
    /// Starts the compute thread for `hosted`; it ends when the `Batcher` is dropped.
    pub(super) fn start(hosted: Arc<Mutex<Hosted>>, opts: BatchOptions) -> Batcher {
        let (queue, rx) = mpsc::channel();
        let stats = Arc::new(BatchStats::default());
        let latent = lock(&hosted).latent_width().is_some();
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("blocktrain-batch".into())
            .spawn(move || run(&hosted, &opts, &rx, &thread_stats))
            .expect("spawning the compute thread");
        Batcher {
            queue,
            latent,
            stats,
        }
    }

    /// Computes `job` in the next batch of its key and gives its result.
    pub(super) async fn compute(&self, job: DenoiseJob) -> Computed {
        let key = BatchKey::new(job.tokens.len(), &job.sampling, self.latent);
        let (reply, result) = oneshot::channel();
        let stopped = || "the compute thread has stopped".to_string();
        self.queue
            .send(Queued { key, job, reply })
            .map_err(|_| stopped())?;
        result.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn lock(hosted: &Mutex<Hosted>) -> std::sync::MutexGuard<'_, Hosted> {
    hosted.lock().unwrap_or_else(|p| p.into_inner())
}

/// The compute thread: gathers a batch, computes it, answers, until the server is gone.
fn run(
    hosted: &Mutex<Hosted>,
    opts: &BatchOptions,
    rx: &mpsc::Receiver<Queued>,
    stats: &BatchStats,
) {
    let max = opts.max_batch.clamp(1, MAX_BATCH_LIMIT);
    let mut waiting: VecDeque<Queued> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match rx.recv() {
                Ok(q) => waiting.push_back(q),
                Err(_) => return, // the server is gone
            }
        }
        waiting.extend(rx.try_iter());
        let key = waiting[0].key;
        let deadline = Instant::now() + opts.window;
        while waiting.iter().filter(|q| q.key == key).count() < max {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(q) => waiting.push_back(q),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let batch = take_batch(&mut waiting, key, max);
        if batch.is_empty() {
            continue; // every one of them gave up waiting
        }
        let jobs: Vec<DenoiseJob> = batch.iter().map(|q| q.job.clone()).collect();
        let results = compute(&lock(hosted), &jobs);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .requests
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        for (q, r) in batch.into_iter().zip(results) {
            let _ = q.reply.send(r); // a caller that went away needs no answer
        }
    }
}

/// Takes up to `max` waiting requests of `key`, oldest first, dropping the ones whose
/// caller has gone.
fn take_batch(waiting: &mut VecDeque<Queued>, key: BatchKey, max: usize) -> Vec<Queued> {
    let mut batch = Vec::new();
    let mut kept = VecDeque::with_capacity(waiting.len());
    for q in waiting.drain(..) {
        if q.reply.is_closed() {
            continue;
        } else if q.key == key && batch.len() < max {
            batch.push(q);
        } else {
            kept.push_back(q);
        }
    }
    *waiting = kept;
    batch
}

/// One batch's results; a panic fails only the request that causes it.
fn compute(hosted: &Hosted, jobs: &[DenoiseJob]) -> Vec<Computed> {
    let alone = |j: &DenoiseJob| {
        catch_unwind(AssertUnwindSafe(|| {
            hosted.denoise(&j.tokens, j.latent.as_ref(), &j.sampling, j.seed)
        }))
        .map_err(|p| format!("compute failed: {}", panic_text(p.as_ref())))
    };
    if let [job] = jobs {
        return vec![alone(job)];
    }
    match catch_unwind(AssertUnwindSafe(|| hosted.denoise_batch(jobs))) {
        Ok(results) => results.into_iter().map(Ok).collect(),
        Err(_) => jobs.iter().map(alone).collect(),
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}
