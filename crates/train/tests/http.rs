//! The HTTP layer in-process: a real server and the worker's client, for what the
//! process tests do not reach cheaply: resumable and verified downloads, data residency,
//! rate-adapted local steps.
use blocktrain_model::config::ModelConfig;
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::wire::{DataShard, RegisterRequest, WorkReply, WorkerInfo, WIRE_VERSION};
use blocktrain_train::client::Client;
use blocktrain_train::config::RunConfig;
use blocktrain_train::coordinator::{Coordinator, RunInfo};
use blocktrain_train::{now_ms, server};

fn tiny() -> RunConfig {
    let mut c = RunConfig {
        blocks: 1,
        model: ModelConfig::tiny_block(),
        ..Default::default()
    };
    c.training.workers_per_block = 4;
    c.training.local_steps = 40;
    c.training.round_seconds = 2.0;
    c
}

fn info(rate: Option<f64>, data: Option<DataShard>) -> WorkerInfo {
    WorkerInfo {
        wire_version: WIRE_VERSION,
        device: "cpu".into(),
        memory_bytes: 1 << 30,
        step_rate: rate,
        data,
    }
}

fn lease(c: &mut Client, rate: Option<f64>) -> blocktrain_protocol::wire::Lease {
    match c
        .post_json::<_, WorkReply>("/v1/work", &info(rate, None))
        .unwrap()
    {
        WorkReply::Lease(l) => l,
        other => panic!("{other:?}"),
    }
}

#[test]
fn downloads_resume_verify_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::open(&dir.path().join("state"), Some(tiny()), now_ms()).unwrap();
    let running = server::spawn("127.0.0.1:0".parse().unwrap(), coord).unwrap();
    let id = Identity::generate();
    let mut c = Client::new(&running.url(), id.clone()).unwrap();
    let shard = DataShard {
        blake3: "ab".repeat(32),
        bytes: 12345,
    };
    let req = RegisterRequest {
        info: info(None, Some(shard.clone())),
        join_proof: None,
    };
    let _: RunInfo = c.post_json("/v1/register", &req).unwrap();
    let l = lease(&mut c, None);

    // A partial download from an earlier attempt: only the rest is fetched.
    let blob = std::fs::read(
        dir.path()
            .join(format!("state/blobs/{}.safetensors", l.weights_hash)),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let partial = cache.join(format!(
        "{}.{}.partial",
        l.weights_hash,
        &id.public_hex()[..12]
    ));
    std::fs::write(&partial, &blob[..1000]).unwrap();
    let got = c.checkpoint(&l.weights_hash, &cache).unwrap();
    assert_eq!(got, blob);
    assert_eq!(
        c.bytes_down,
        (blob.len() - 1000) as u64,
        "resumed with a Range request"
    );
    // Cached now: no bytes move.
    c.checkpoint(&l.weights_hash, &cache).unwrap();
    assert_eq!(c.bytes_down, (blob.len() - 1000) as u64);
    // A corrupt cache entry is detected and replaced.
    let done = cache.join(format!("{}.safetensors", l.weights_hash));
    std::fs::write(&done, b"garbage").unwrap();
    assert_eq!(c.checkpoint(&l.weights_hash, &cache).unwrap(), blob);
    // A hash the coordinator never committed is not served.
    let e = c.checkpoint(&"cd".repeat(32), &cache).unwrap_err();
    assert!(e.to_string().contains("no checkpoint"), "{e}");

    // Data residency: the coordinator knows the shard's blake3 and size, nothing more.
    let s = running.status().unwrap();
    assert_eq!(
        s.workers[0].data_blake3.as_deref(),
        Some(shard.blake3.as_str())
    );
    assert_eq!(s.workers[0].data_bytes, Some(12345));
    assert_eq!(s.bytes_down, c.bytes_down, "server counted what it served");
}

#[test]
fn local_steps_follow_each_workers_measured_rate() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::open(dir.path(), Some(tiny()), now_ms()).unwrap();
    let running = server::spawn("127.0.0.1:0".parse().unwrap(), coord).unwrap();
    let mut steps = Vec::new();
    for rate in [None, Some(5.0), Some(40.0), Some(1000.0)] {
        let mut c = Client::new(&running.url(), Identity::generate()).unwrap();
        let req = RegisterRequest {
            info: info(rate, None),
            join_proof: None,
        };
        let _: RunInfo = c.post_json("/v1/register", &req).unwrap();
        steps.push(lease(&mut c, rate).steps);
    }
    // H = 40 until a rate is known; then rate x 2 s, clamped to [H/4, 4H].
    assert_eq!(steps, vec![40, 10, 80, 160]);
}

#[test]
fn the_checkpoint_cache_keeps_only_the_newest_files() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..7 {
        std::fs::write(dir.path().join(format!("{i}.safetensors")), [i as u8]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::fs::write(dir.path().join("x.partial"), b"in progress").unwrap();
    blocktrain_train::client::prune_cache(dir.path(), 4);
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "3.safetensors",
            "4.safetensors",
            "5.safetensors",
            "6.safetensors",
            "x.partial"
        ]
    );
}

/// Heartbeats and work requests that hand out nothing are answered from the core while
/// the coordinator's lock is held (as a merge, a decision or a slow disk would hold it);
/// a request that needs the journal (a new lease) waits for the lock.
#[test]
fn heartbeats_and_waits_never_wait_for_the_coordinators_lock() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny();
    cfg.training.workers_per_block = 2;
    cfg.training.round_seconds = 0.0;
    let coord = Coordinator::open(&dir.path().join("state"), Some(cfg), now_ms()).unwrap();
    let running = server::spawn("127.0.0.1:0".parse().unwrap(), coord).unwrap();
    let client = |id: Identity| {
        let mut c = Client::new(&running.url(), id).unwrap();
        let req = RegisterRequest {
            info: info(None, None),
            join_proof: None,
        };
        let _: RunInfo = c.post_json("/v1/register", &req).unwrap();
        c
    };
    let (mut a, mut b, mut c) = (
        client(Identity::generate()),
        client(Identity::generate()),
        client(Identity::generate()),
    );
    let held = lease(&mut a, None);
    let busy = running.coord.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let path = format!("/v1/leases/{}/heartbeat", held.id);
    let fast = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        let beat: serde_json::Value = a.post_empty(&path).unwrap();
        let again = lease(&mut a, None);
        tx.send((t.elapsed(), beat, again.id)).unwrap();
    });
    let (took, beat, again) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("a heartbeat and a retried work request are answered while the lock is held");
    assert_eq!(beat["still_wanted"], true);
    assert_eq!(again, held.id, "the held lease, from memory");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    fast.join().unwrap();
    // A new lease is journaled before its reply: it waits for the lock.
    let (tx, rx) = std::sync::mpsc::channel();
    let slow = std::thread::spawn(move || tx.send(lease(&mut b, None).id).unwrap());
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(500))
            .is_err(),
        "a new lease was handed out without the journal"
    );
    drop(busy);
    let issued = rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
    assert_ne!(issued, held.id);
    slow.join().unwrap();
    // Every slot is taken now: the third worker is told to wait, from memory.
    let busy = running.coord.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiting = std::thread::spawn(move || {
        let reply: WorkReply = c.post_json("/v1/work", &info(None, None)).unwrap();
        tx.send(reply).unwrap();
    });
    let reply = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert!(matches!(reply, WorkReply::Wait { .. }), "{reply:?}");
    drop(busy);
    waiting.join().unwrap();
}
