//! `/metrics`: the exposition parsed back and checked for what scrapers and alerts
//! rely on (counters named `_total`, update states present from the start, labels that
//! stay bounded however many workers join, held-out loss, build and process info),
//! and `promtool check metrics` when promtool is installed.
use std::collections::{HashMap, HashSet};

use blocktrain_model::config::ModelConfig;
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::wire::{RegisterRequest, WorkerInfo, WIRE_VERSION};
use blocktrain_train::client::Client;
use blocktrain_train::config::RunConfig;
use blocktrain_train::coordinator::{BlockStatus, Coordinator, RunInfo, Status, WorkerStatus};
use blocktrain_train::{now_ms, server};

/// One sample: family name, labels, value.
type Sample = (String, HashMap<String, String>, f64);

/// Parses the text format strictly enough to catch what scrapers reject: every sample
/// belongs to a family whose HELP and TYPE came first, label values are quoted,
/// values are numbers, and no series appears twice. Returns (family -> type, samples).
fn parse(text: &str) -> (HashMap<String, String>, Vec<Sample>) {
    let mut types = HashMap::new();
    let mut helps = HashSet::new();
    let mut samples = Vec::new();
    let mut seen = HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has text");
            assert!(!help.trim().is_empty(), "{line}");
            assert!(helps.insert(name.to_string()), "HELP twice: {line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            assert!(helps.contains(name), "TYPE before HELP: {line}");
            assert!(types.insert(name.to_string(), kind.to_string()).is_none());
        } else {
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.strip_suffix('}').expect("labels closed")),
                None => (series, ""),
            };
            assert!(types.contains_key(name), "sample before its TYPE: {line}");
            let mut map = HashMap::new();
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap();
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                map.insert(k.to_string(), v.expect("quoted label value").to_string());
            }
            assert!(seen.insert(series.to_string()), "series twice: {line}");
            samples.push((name.to_string(), map, value));
        }
    }
    (types, samples)
}

fn get<'a>(samples: &'a [Sample], name: &str, label: Option<(&str, &str)>) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name && label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v))
        })
        .collect()
}

fn status(workers: usize, now: u64) -> Status {
    let block = |b: usize, heldout: Option<f64>| BlockStatus {
        block: b,
        version: 2,
        rounds: 3,
        active_leases: 1,
        pending_updates: 0,
        steps: 600,
        weights: "00".repeat(32),
        bytes_up: 1024,
        bytes_down: 3 << 20,
        heldout,
        stalled: b == 1,
    };
    let worker = |i: usize| WorkerStatus {
        key: format!("{i:064x}"),
        device: "cpu".into(),
        step_rate: None,
        data_blake3: None,
        data_bytes: None,
        // Every other worker was last heard from ten minutes ago.
        last_seen_ms: now - if i.is_multiple_of(2) { 1000 } else { 600_000 },
        bytes_up: 768,
        bytes_down: 3 << 20,
    };
    Status {
        done: false,
        blocks: vec![block(0, Some(1.25)), block(1, None)],
        workers: (0..workers).map(worker).collect(),
        updates: HashMap::from([("applied".into(), 5)]),
        stale_applied: 0,
        recent: vec![],
        bytes_up: 1536,
        bytes_down: 6 << 20,
        flagged: vec![],
    }
}

#[test]
fn the_exposition_is_well_formed_bounded_and_complete() {
    let now = now_ms();
    let text = server::prometheus_text(&status(4, now), now, 60_000);
    let (types, samples) = parse(&text);
    for (name, kind) in &types {
        assert_eq!(
            kind == "counter",
            name.ends_with("_total"),
            "{name} is a {kind}"
        );
    }
    // All three update states from the start.
    for (state, n) in [("applied", 5.0), ("pending", 0.0), ("rejected", 0.0)] {
        let s = get(&samples, "blocktrain_updates_total", Some(("state", state)));
        assert_eq!(s.len(), 1, "{state}: {text}");
        assert_eq!(s[0].2, n);
    }
    assert_eq!(get(&samples, "blocktrain_block_steps_total", None).len(), 2);
    // Held-out loss only for the block that has one.
    let stalled = get(&samples, "blocktrain_block_stalled", None);
    let stalled: Vec<(&str, f64)> = stalled
        .iter()
        .map(|(_, l, v)| (l["block"].as_str(), *v))
        .collect();
    assert_eq!(stalled, vec![("1", 0.0), ("2", 1.0)], "one row per block");
    let h = get(&samples, "blocktrain_block_heldout_loss", None);
    assert_eq!(h.len(), 1, "{text}");
    assert_eq!((h[0].1["block"].as_str(), h[0].2), ("1", 1.25));
    // Aggregates instead of per-worker series.
    assert!(
        samples.iter().all(|(_, l, _)| !l.contains_key("worker")),
        "{text}"
    );
    assert!(
        !text.contains(&format!("{:064x}", 1)),
        "a worker key leaked: {text}"
    );
    assert_eq!(get(&samples, "blocktrain_workers", None)[0].2, 4.0);
    assert_eq!(get(&samples, "blocktrain_active_workers", None)[0].2, 2.0);
    let b = get(&samples, "blocktrain_build_info", None);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].1["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(b[0].2, 1.0);
    // However many workers register, the number of series stays the same.
    let many = server::prometheus_text(&status(5000, now), now, 60_000);
    assert_eq!(parse(&many).1.len(), samples.len());
}

fn tiny() -> RunConfig {
    RunConfig {
        blocks: 2,
        model: ModelConfig::tiny_block(),
        ..Default::default()
    }
}

/// `/metrics` of a live coordinator with one registered worker: (content type, body).
fn scrape() -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::open(dir.path(), Some(tiny()), now_ms()).unwrap();
    let running = server::spawn("127.0.0.1:0".parse().unwrap(), coord).unwrap();
    let mut c = Client::new(&running.url(), Identity::generate()).unwrap();
    let info = WorkerInfo {
        wire_version: WIRE_VERSION,
        device: "cpu".into(),
        memory_bytes: 1 << 30,
        step_rate: None,
        data: None,
    };
    let req = RegisterRequest {
        info,
        join_proof: None,
    };
    let _: RunInfo = c.post_json("/v1/register", &req).unwrap();
    // Public reads come from the status snapshot, refreshed every 250 ms.
    std::thread::sleep(std::time::Duration::from_millis(600));
    let r = reqwest::blocking::get(format!("{}/metrics", running.url())).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ctype = r.headers()["content-type"].to_str().unwrap().to_string();
    (ctype, r.text().unwrap())
}

#[test]
fn a_live_scrape_has_run_and_process_metrics() {
    let (ctype, text) = scrape();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let (_, samples) = parse(&text);
    assert_eq!(get(&samples, "blocktrain_workers", None)[0].2, 1.0);
    assert_eq!(get(&samples, "blocktrain_active_workers", None)[0].2, 1.0);
    let one = |name: &str| -> Option<f64> { get(&samples, name, None).first().map(|s| s.2) };
    if !cfg!(target_os = "linux") {
        assert!(one("process_resident_memory_bytes").is_none());
        return;
    }
    let rss = one("process_resident_memory_bytes").expect("rss");
    assert!(rss > 1e6 && rss < 1e12, "{rss}");
    assert!(one("process_open_fds").expect("fds") >= 3.0);
    assert!(one("process_cpu_seconds_total").expect("cpu") > 0.0);
    let start = one("process_start_time_seconds").expect("start time");
    let now = now_ms() as f64 / 1e3;
    // This test's own process: started before now, and not long before.
    assert!(
        start <= now + 1.0 && start > now - 3600.0,
        "{start} vs {now}"
    );
}

#[test]
fn promtool_accepts_the_exposition() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        println!("skipped: promtool not on PATH (Debian: apt-get install prometheus)");
        return;
    };
    let (_, text) = scrape();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{text}"
    );
}
