//! `bench load`'s simulated workers, as async tasks on one small runtime: each has its own
//! key and its own HTTP connection, and does what a worker does on the wire without
//! training (register, ask for work, renew its lease, poll `/v1/status` every tenth
//! request). Tasks instead of a thread each (and a blocking client's runtime thread
//! each) keep the load generator's own cost low on the two cores it shares with the
//! coordinator, so what is measured is the coordinator.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::signed;
use blocktrain_protocol::wire::{RegisterRequest, WorkReply, WorkerInfo};
use blocktrain_train::now_ms;

/// What the simulated workers saw.
#[derive(Default)]
pub struct Tally {
    /// Latency of every answered request, ms.
    pub latencies_ms: Vec<f64>,
    /// Requests that failed (transport error or non-2xx other than 429).
    pub errors: u64,
    /// Requests the coordinator's rate limits refused (429): the load is above what it
    /// allows one key (50/s) or, for `/v1/status`, one address (500/s).
    pub rate_limited: u64,
    /// Leases handed out.
    pub leases: u64,
    /// Work requests told to wait.
    pub waits: u64,
}

/// When the load stops (set once every worker registered).
pub type StopAt = Arc<Mutex<Option<Instant>>>;

struct Worker {
    http: reqwest::Client,
    id: Identity,
}

impl Worker {
    /// The body of a 2xx answer; else the status (None: no answer).
    async fn send(
        &self,
        url: &str,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, Option<u16>> {
        let auth = signed::sign(&self.id, method, path, now_ms(), &body);
        let req = match method {
            "GET" => self.http.get(format!("{url}{path}")),
            _ => self
                .http
                .post(format!("{url}{path}"))
                .header("content-type", "application/json")
                .body(body),
        };
        let resp = req
            .header(signed::KEY_HEADER, auth.key)
            .header(signed::TIME_HEADER, auth.time_ms.to_string())
            .header(signed::NONCE_HEADER, auth.nonce)
            .header(signed::SIG_HEADER, auth.sig)
            .send()
            .await
            .map_err(|_| None)?;
        if !resp.status().is_success() {
            return Err(Some(resp.status().as_u16()));
        }
        resp.bytes().await.map(|b| b.to_vec()).map_err(|_| None)
    }
}

/// Starts `workers` simulated workers on their own thread; returns once every one has
/// tried to register (failures are counted as errors), with the thread to join. Each
/// then loads the coordinator at `url` until `stop_at`.
pub fn start(
    url: &str,
    workers: usize,
    think: Duration,
    tally: Arc<Mutex<Tally>>,
    stop_at: StopAt,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let url = url.to_string();
    let thread = std::thread::spawn(move || {
        rt.block_on(async move {
            let mut joining = tokio::task::JoinSet::new();
            for _ in 0..workers {
                let url = url.clone();
                joining.spawn(async move { register(&url).await });
            }
            let mut ready = Vec::new();
            while let Some(joined) = joining.join_next().await {
                match joined.ok().flatten() {
                    Some(w) => ready.push(w),
                    None => tally.lock().unwrap().errors += 1,
                }
            }
            let _ = ready_tx.send(());
            let mut running = tokio::task::JoinSet::new();
            for w in ready {
                let (url, tally, stop_at) = (url.clone(), tally.clone(), stop_at.clone());
                running.spawn(async move { work_loop(w, &url, think, &tally, &stop_at).await });
            }
            while running.join_next().await.is_some() {}
        })
    });
    ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the load generator stopped before its workers registered"))?;
    Ok(thread)
}

async fn register(url: &str) -> Option<Worker> {
    // One connection per worker, kept alive, as a real worker's client would.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(60))
        .build()
        .ok()?;
    let w = Worker {
        http,
        id: Identity::generate(),
    };
    let body = serde_json::to_vec(&RegisterRequest {
        info: WorkerInfo::new("cpu"),
        join_proof: None,
    })
    .ok()?;
    w.send(url, "POST", "/v1/register", body).await.ok()?;
    Some(w)
}

async fn work_loop(w: Worker, url: &str, think: Duration, tally: &Mutex<Tally>, stop_at: &StopAt) {
    let info = serde_json::to_vec(&WorkerInfo::new("cpu")).expect("worker info serialises");
    let mut lease = None;
    let mut i = 0u64;
    loop {
        if stop_at.lock().unwrap().is_some_and(|t| Instant::now() >= t) {
            return;
        }
        i += 1;
        let t = Instant::now();
        let (answer, kind) = match (&lease, i % 10) {
            (_, 0) => (w.send(url, "GET", "/v1/status", Vec::new()).await, 0),
            (Some(id), _) => {
                let path = format!("/v1/leases/{id}/heartbeat");
                (w.send(url, "POST", &path, Vec::new()).await, 0)
            }
            (None, _) => match w.send(url, "POST", "/v1/work", info.clone()).await {
                Ok(body) => match serde_json::from_slice::<WorkReply>(&body) {
                    Ok(WorkReply::Lease(l)) => {
                        lease = Some(l.id);
                        (Ok(body), 1)
                    }
                    Ok(_) => (Ok(body), 2),
                    Err(_) => (Err(None), 0),
                },
                Err(e) => (Err(e), 0),
            },
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        {
            let mut tl = tally.lock().unwrap();
            match answer {
                Ok(_) => tl.latencies_ms.push(ms),
                Err(Some(429)) => tl.rate_limited += 1,
                Err(_) => tl.errors += 1,
            }
            tl.leases += u64::from(kind == 1);
            tl.waits += u64::from(kind == 2);
        }
        if !think.is_zero() {
            tokio::time::sleep(think).await;
        }
    }
}
