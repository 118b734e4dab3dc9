//! The dashboard at `/`: served as HTML by a real coordinator, and rendered by headless
//! Chromium (`--dump-dom` after the page's JS has polled the API), both against a live
//! coordinator and against canned JSON that exercises the chart and the receipts.
//! Without a `chromium` (or `chromium-browser`) binary on PATH the Chromium tests say
//! they are skipped and pass.
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::response::Html;
use axum::routing::get;
use axum::{Json, Router};
use blocktrain_model::config::ModelConfig;
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::wire::{RegisterRequest, WorkReply, WorkerInfo, WIRE_VERSION};
use blocktrain_train::client::Client;
use blocktrain_train::config::RunConfig;
use blocktrain_train::coordinator::{BlockStatus, Coordinator, RunInfo, Status, WorkerStatus};
use blocktrain_train::dashboard::{ELEMENT_IDS, PAGE};
use blocktrain_train::store::UpdateRecord;
use blocktrain_train::{now_ms, server};
use serde_json::json;

/// A rejection reason a hostile worker could make the coordinator record: it must come
/// out as text, never as markup.
const HOSTILE: &str = r#"<img src=x onerror="document.title='pwned'"><b id="pwn">bold</b>"#;

fn config(blocks: usize) -> RunConfig {
    let mut c = RunConfig {
        blocks,
        model: ModelConfig::tiny_block(),
        ..Default::default()
    };
    c.training.workers_per_block = 2;
    c.training.round_seconds = 60.0;
    c
}

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The DOM after the page ran for 5 s of virtual time (two polls).
fn dump_dom(chromium: &PathBuf, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dom = reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    assert!(
        status.success() && dom.contains("</html>"),
        "chromium failed ({status}); stderr:\n{stderr}"
    );
    println!(
        "chromium rendered {url} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    dom
}

/// Whether the element with this id is shown (has no `hidden` attribute).
fn shown(dom: &str, id: &str) -> bool {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the DOM"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap();
    !dom[start..end].contains(" hidden")
}

/// The text of the element with this id, up to its first child tag.
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the DOM"));
    let rest = &dom[at + dom[at..].find('>').unwrap() + 1..];
    &rest[..rest.find('<').unwrap()]
}

fn assert_escaped(dom: &str) {
    assert!(
        dom.contains(r#"&lt;b id="pwn"&gt;bold&lt;/b&gt;"#),
        "the hostile reason is shown as text"
    );
    assert!(!dom.contains(r#"<b id="pwn">"#), "the reason became markup");
    assert!(dom.contains("<title>BlockTrain coordinator</title>"));
}

fn http_status(url: &str) -> u16 {
    reqwest::blocking::get(url).unwrap().status().as_u16()
}

#[test]
fn index_serves_the_dashboard_page() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::open(dir.path(), Some(config(2)), now_ms()).unwrap();
    let running = server::spawn("127.0.0.1:0".parse().unwrap(), coord).unwrap();
    let resp = reqwest::blocking::get(format!("{}/", running.url())).unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/html"), "{ctype}");
    let body = resp.text().unwrap();
    assert_eq!(body, PAGE);
    for id in ELEMENT_IDS {
        assert!(body.contains(&format!("id=\"{id}\"")), "missing #{id}");
    }
    // The JSON the page polls is still there.
    assert_eq!(http_status(&format!("{}/v1/status", running.url())), 200);
}

#[test]
fn chromium_renders_a_live_coordinator() {
    let Some(chromium) = chromium() else {
        println!("skipped: chromium not installed (apt-get install chromium)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::open(dir.path(), Some(config(2)), now_ms()).unwrap();
    let running = server::spawn("127.0.0.1:0".parse().unwrap(), coord).unwrap();
    // One registered worker holding a lease, and one recorded rejection with a reason a
    // worker controls.
    let mut c = Client::new(&running.url(), Identity::generate()).unwrap();
    let info = WorkerInfo {
        wire_version: WIRE_VERSION,
        device: "cpu".into(),
        memory_bytes: 1 << 30,
        step_rate: None,
        data: None,
    };
    let req = RegisterRequest {
        info: info.clone(),
        join_proof: None,
    };
    let _: RunInfo = c.post_json("/v1/register", &req).unwrap();
    match c.post_json::<_, WorkReply>("/v1/work", &info).unwrap() {
        WorkReply::Lease(_) => {}
        other => panic!("{other:?}"),
    }
    running
        .coord
        .lock()
        .unwrap()
        .record_rejection("stranger", None, 0, HOSTILE, now_ms())
        .unwrap();

    // The worker's key announces a block server whose model id is markup: listed as
    // text, with the model's coverage and its gap.
    let announcement = blocktrain_protocol::registry::Announcement {
        model_id: "<i>m</i>".into(),
        family: "block".into(),
        blocks: blocktrain_protocol::frame::BlockRange { first: 1, last: 1 },
        total: 2,
        addr: "10.1.2.3:7100".into(),
        served: 5,
        passes_per_s: 1.5,
        pass_ms: Some(12.0),
        ttl_secs: 60,
        join_proof: None,
    };
    let _: serde_json::Value = c.post_json("/v1/servers/announce", &announcement).unwrap();

    let dom = dump_dom(&chromium, &format!("{}/", running.url()));
    assert_eq!(dom.matches("class=\"server-row\"").count(), 1, "{dom}");
    assert!(dom.contains("10.1.2.3:7100"));
    assert!(
        text_of(&dom, "coverage").contains("no server for blocks 2"),
        "{dom}"
    );
    assert!(dom.contains("&lt;i&gt;m&lt;/i&gt;") && !dom.contains("<i>m</i>"));
    // The blocks table was filled from /v1/status: one row per block.
    assert!(dom.contains("id=\"blocks-table\""));
    assert_eq!(dom.matches("class=\"block-row\"").count(), 2, "{dom}");
    assert!(dom.contains("id=\"block-row-0\"") && dom.contains("id=\"block-row-1\""));
    assert_eq!(text_of(&dom, "blocks-done"), "0 / 2");
    assert_eq!(dom.matches("class=\"worker-row\"").count(), 1);
    assert!(dom.contains("id=\"ce-chart\""));
    assert!(dom.contains("class=\"update-row rejected\""));
    assert_escaped(&dom);
    // Endpoints the coordinator does not serve yet leave their "no ... yet" line.
    if http_status(&format!("{}/v1/history", running.url())) == 404 {
        assert!(shown(&dom, "ce-empty"), "no held-out history yet");
        assert!(dom.contains("no held-out history yet"));
    }
    if http_status(&format!("{}/v1/ledger/receipts?recent=20", running.url())) == 404 {
        assert!(shown(&dom, "receipts-empty"), "no receipts yet");
    }
    assert!(!text_of(&dom, "conn").contains("unreachable"));
}

/// A status with two blocks (the second finished), two workers and one rejection.
fn canned_status(now: u64) -> Status {
    let block = |b: usize, version: u64| BlockStatus {
        block: b,
        version,
        rounds: 3,
        active_leases: 1 - b as u32,
        pending_updates: 0,
        steps: 600 + b as i64 * 100,
        weights: "00".repeat(32),
        bytes_up: 1024,
        bytes_down: 3 << 20,
        heldout: Some(1.5),
        // Block 1 (v2 of 3, unfinished) is stalled; block 2 is done.
        stalled: b == 0,
    };
    let worker = |key: &str| WorkerStatus {
        key: key.repeat(32),
        device: "cuda".into(),
        step_rate: Some(12.5),
        data_blake3: None,
        data_bytes: None,
        last_seen_ms: now - 2000,
        bytes_up: 768,
        bytes_down: 3 << 20,
    };
    Status {
        done: false,
        blocks: vec![block(0, 2), block(1, 3)],
        workers: vec![worker("ab"), worker("cd")],
        updates: HashMap::from([("applied".into(), 5), ("rejected".into(), 1)]),
        stale_applied: 0,
        recent: vec![UpdateRecord {
            id: 6,
            worker: "cd".repeat(32),
            block: Some(0),
            version: Some(2),
            bytes: 512,
            state: "rejected".into(),
            reason: Some(HOSTILE.into()),
            loss: None,
            staleness: 0,
        }],
        bytes_up: 1536,
        bytes_down: 6 << 20,
        flagged: vec![],
    }
}

#[test]
fn chromium_renders_history_chart_and_receipts() {
    let Some(chromium) = chromium() else {
        println!("skipped: chromium not installed (apt-get install chromium)");
        return;
    };
    let now = now_ms();
    let status = canned_status(now);
    // Block 1 has three points, block 2 a single one (a line of one point is a marker).
    let history = json!({"blocks": [
        {"block": 0, "points": [
            {"version": 0, "time_ms": now - 120_000, "heldout": 2.5},
            {"version": 1, "time_ms": now - 60_000, "heldout": 2.4},
            {"version": 2, "time_ms": now - 1_000, "heldout": 2.3},
        ]},
        {"block": 1, "points": [
            {"version": 0, "time_ms": now - 90_000, "heldout": 2.0},
        ]},
    ]});
    let receipts = json!({"receipts": [
        {"index": 5, "worker": "ab".repeat(32), "block": 0, "base_version": 1, "accepted": true,
         "reason": null, "resulting_version": 2, "heldout_before": 2.4, "heldout_after": 2.3,
         "steps": 50, "time_ms": now - 1_000},
        {"index": 6, "worker": "cd".repeat(32), "block": 0, "base_version": 2, "accepted": false,
         "reason": HOSTILE, "resulting_version": null, "heldout_before": 2.3,
         "heldout_after": 2.6, "steps": 50, "time_ms": now - 500},
    ]});
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/v1/status", get(move || async move { Json(status) }))
        .route("/v1/history", get(move || async move { Json(history) }))
        .route(
            "/v1/ledger/receipts",
            get(move || async move { Json(receipts) }),
        );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });

    let dom = dump_dom(&chromium, &format!("http://{addr}/"));
    // Header: progress and steps.
    assert_eq!(text_of(&dom, "blocks-done"), "1 / 2");
    assert_eq!(text_of(&dom, "total-steps"), "1,300");
    assert_eq!(text_of(&dom, "heldout-total"), "4.300");
    // Blocks table with the latest held-out CE and its change.
    assert_eq!(dom.matches("class=\"block-row\"").count(), 2);
    // The stalled block says so, in its row; the finished one does not.
    assert_eq!(dom.matches("class=\"reason stalled\"").count(), 1, "{dom}");
    assert!(
        dom.contains("block 1<span class=\"reason stalled\">stalled:"),
        "{dom}"
    );
    assert!(dom.contains("2.300<span class=\"down\"> (-0.200)</span>"));
    // Chart: a line per block plus the total, a marker for the single point, legend.
    assert!(!shown(&dom, "ce-empty"));
    assert_eq!(dom.matches("<polyline").count(), 3, "{dom}");
    assert_eq!(dom.matches("class=\"ce-line ce-total\"").count(), 1);
    assert_eq!(dom.matches("class=\"ce-point\"").count(), 3 + 1 + 3);
    assert_eq!(dom.matches("class=\"legend-item\"").count(), 3);
    assert!(dom.contains("total (right axis) 4.300"));
    assert!(dom.contains("per block (nats/byte)") && dom.contains("time (local)"));
    // Bytes in human units.
    assert_eq!(text_of(&dom, "bytes-up"), "1.50 KiB");
    assert_eq!(text_of(&dom, "bytes-down"), "6.00 MiB");
    assert_eq!(dom.matches("class=\"worker-row\"").count(), 2);
    // Receipts: the rejection highlighted, its reason as text.
    assert!(!shown(&dom, "receipts-empty"));
    assert_eq!(dom.matches("class=\"receipt-row accepted\"").count(), 1);
    assert_eq!(dom.matches("class=\"receipt-row rejected\"").count(), 1);
    assert!(dom.contains("1 → 2"));
    assert_escaped(&dom);
}
