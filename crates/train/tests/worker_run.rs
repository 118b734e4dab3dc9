//! Whole worker runs in-process against a real coordinator (tiny blocks, a few steps
//! per lease): each key's own record, the audit on every way out, backing off after
//! refusals, and a coordinator whose key changed or whose listing leaves receipts out.
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use blocktrain_model::config::ModelConfig;
use blocktrain_train::config::{OuterKind, RunConfig};
use blocktrain_train::coordinator::Coordinator;
use blocktrain_train::ledger::Ledger;
use blocktrain_train::worker::{
    key_dir, load_or_create_key, Backoff, Control, Malice, WorkerOptions, WorkerSummary,
};
use blocktrain_train::{now_ms, server, NodeError};

mod support;
use support::{serve, Served};

/// One block, one worker per round (so each accepted update closes its round and gets
/// its receipt at once), two local steps per lease, no screening or spot checks.
fn tiny() -> RunConfig {
    let mut c = RunConfig {
        blocks: 1,
        model: ModelConfig::tiny_block(),
        dataset: "shakespeare".into(),
        ..Default::default()
    };
    c.training.workers_per_block = 1;
    c.training.rounds = 50;
    c.training.local_steps = 2;
    c.training.batch = 2;
    c.training.round_seconds = 0.0;
    c.outer.optimizer = OuterKind::Average;
    c.trust.screen_windows = 0;
    c.trust.spot_check_fraction = 0.0;
    c
}

fn coordinator(dir: &Path, cfg: RunConfig) -> server::Running {
    tch::set_num_threads(1);
    let coord = Coordinator::open(dir, Some(cfg), now_ms()).unwrap();
    server::spawn("127.0.0.1:0".parse().unwrap(), coord).unwrap()
}

/// Worker `name`: its key in `dir/keys/` and the cache root `dir/cache` shared by all,
/// as `blocktrain worker` lays them out by default.
fn opts(url: &str, dir: &Path, name: &str, max_leases: Option<usize>) -> WorkerOptions {
    WorkerOptions {
        coordinator: url.to_string(),
        key: dir.join(format!("keys/{name}.key")),
        data: None,
        cache: dir.join("cache"),
        device: tch::Device::Cpu,
        join_secret: None,
        max_leases,
        retry_for: Duration::from_secs(5),
        malice: None,
        tls: Default::default(),
    }
}

fn quick() -> Control {
    Control {
        backoff: Backoff {
            first: Duration::from_millis(10),
            cap: Duration::from_millis(40),
        },
        ..Control::default()
    }
}

/// The record directory of worker `name`.
fn record_of(dir: &Path, name: &str) -> std::path::PathBuf {
    let key = load_or_create_key(&dir.join(format!("keys/{name}.key"))).unwrap();
    key_dir(&dir.join("cache"), &key.public_hex())
}

fn kept_size(record: &Path) -> Option<u64> {
    let bytes = std::fs::read(record.join("ledger-head.json")).ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["size"].as_u64()
}

fn journal(record: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(record.join("uploads.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn two_keys_in_one_directory_keep_their_own_records_and_are_audited_at_max_leases() {
    let dir = tempfile::tempdir().unwrap();
    let running = coordinator(&dir.path().join("state"), tiny());
    let url = running.url();
    for name in ["a", "b"] {
        let s = quick().run(&opts(&url, dir.path(), name, Some(1))).unwrap();
        assert_eq!(s.accepted, 1, "{s:?}");
    }
    let (a, b) = (record_of(dir.path(), "a"), record_of(dir.path(), "b"));
    assert_ne!(a, b);
    // Each was audited when it stopped at --max-leases, against its own head: a's after
    // its own receipt, b's after both.
    assert_eq!((kept_size(&a), kept_size(&b)), (Some(1), Some(2)));
    assert_eq!((journal(&a).len(), journal(&b).len()), (1, 1));
    assert!(journal(&a)[0]["accepted"].as_bool().unwrap());
    // Nothing of either is left in the shared root.
    let root: Vec<_> = std::fs::read_dir(dir.path().join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.is_dir())
        .collect();
    assert!(root.is_empty(), "{root:?}");
}

#[test]
fn a_stopped_worker_audits_before_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let running = coordinator(&dir.path().join("state"), tiny());
    let ctl = quick();
    let record = record_of(dir.path(), "w");
    let (stop, watched) = (ctl.stop.clone(), record.clone());
    // Ctrl-C once the first upload is on record (the run itself would go on for 50 rounds).
    let watcher = std::thread::spawn(move || {
        while journal(&watched).is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let s = ctl
        .run(&opts(&running.url(), dir.path(), "w", None))
        .unwrap();
    watcher.join().unwrap();
    assert!(s.accepted >= 1 && s.accepted < 50, "{s:?}");
    assert_eq!(kept_size(&record), Some(s.accepted as u64));
    assert_eq!(journal(&record).len(), s.accepted);
}

#[test]
fn an_honest_worker_refused_again_and_again_backs_off_and_keeps_asking() {
    let dir = tempfile::tempdir().unwrap();
    // A bound no real update meets: every upload is refused, as a screen's false
    // positive would refuse an honest one, and nothing bars the worker.
    let mut cfg = tiny();
    cfg.wire.max_delta_ratio = 1e-12;
    let running = coordinator(&dir.path().join("state"), cfg);
    let s: WorkerSummary = quick()
        .run(&opts(&running.url(), dir.path(), "w", Some(5)))
        .unwrap();
    assert_eq!((s.accepted, s.refused), (0, 5), "{s:?}");
    // Every refusal is on record with the worker, and the audit found each receipt.
    let record = record_of(dir.path(), "w");
    let j = journal(&record);
    assert_eq!(j.len(), 5);
    assert!(j.iter().all(|u| u["reason"]
        .as_str()
        .is_some_and(|r| r.contains("delta RMS"))));
    assert_eq!(kept_size(&record), Some(5));
}

#[test]
fn a_barred_worker_audits_on_its_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny();
    cfg.trust.spot_check_fraction = 1.0;
    let running = coordinator(&dir.path().join("state"), cfg);
    let mut o = opts(&running.url(), dir.path(), "bad", None);
    o.malice = Some(Malice::Flip);
    // Refused by the spot check and flagged; it backs off, asks again and is barred.
    let e = quick().run(&o).unwrap_err();
    assert!(matches!(e, NodeError::Forbidden(_)), "{e}");
    let record = record_of(dir.path(), "bad");
    assert_eq!(journal(&record).len(), 1);
    assert_eq!(kept_size(&record), Some(1), "audited after the bar");
}

#[test]
fn a_coordinator_with_another_key_gets_no_work_done() {
    let dir = tempfile::tempdir().unwrap();
    let first = coordinator(&dir.path().join("state-a"), tiny());
    quick()
        .run(&opts(&first.url(), dir.path(), "w", Some(1)))
        .unwrap();
    // Another coordinator (another key) at another address, with a ledger of its own.
    let second = coordinator(&dir.path().join("state-b"), tiny());
    quick()
        .run(&opts(&second.url(), dir.path(), "x", Some(1)))
        .unwrap();
    let e = quick()
        .run(&opts(&second.url(), dir.path(), "w", Some(1)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("pinned") && e.contains("Refusing"), "{e}");
    let w = load_or_create_key(&dir.path().join("keys/w.key"))
        .unwrap()
        .public_hex();
    let co = second.coord.lock().unwrap();
    assert!(Ledger::receipts_of(co.conn(), &w).unwrap().is_empty());
    assert_eq!(kept_size(&record_of(dir.path(), "w")), Some(1));
}

/// Passes every request on to `target`, except that a worker's receipt listing comes
/// back empty: a coordinator leaving receipts out.
fn hiding_proxy(target: String) -> Served {
    let http = reqwest::Client::new();
    let app = Router::new().fallback(move |req: Request| {
        let (http, target) = (http.clone(), target.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let url = format!("{target}{}", parts.uri.path_and_query().unwrap());
            let mut r = http.request(parts.method.clone(), url).body(body.to_vec());
            for (k, v) in parts.headers.iter().filter(|(k, _)| *k != "host") {
                r = r.header(k, v);
            }
            let resp = r.send().await.unwrap();
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
            let mut bytes = resp.bytes().await.unwrap().to_vec();
            if parts.uri.path() == "/v1/ledger/receipts" {
                let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                v["receipts"] = serde_json::json!([]);
                bytes = serde_json::to_vec(&v).unwrap();
            }
            (status, bytes).into_response()
        }
    });
    serve(app)
}

#[test]
fn receipts_left_out_of_the_listing_fail_the_audit() {
    let dir = tempfile::tempdir().unwrap();
    let running = coordinator(&dir.path().join("state"), tiny());
    let proxy = hiding_proxy(running.url());
    let e = quick()
        .run(&opts(&proxy.url, dir.path(), "w", Some(1)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ledger audit failed") && e.contains("no receipt for 1 of my uploads"),
        "{e}"
    );
}
