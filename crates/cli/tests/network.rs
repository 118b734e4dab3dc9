//! Network training with real processes on loopback: a coordinator and workers as a
//! user starts them, with workers and the coordinator killed mid-run, and hostile
//! uploads sent by hand.
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blocktrain_node::coordinator::Status;
use blocktrain_protocol::identity::Identity;
use blocktrain_protocol::signed;
use blocktrain_protocol::wire::{Lease, RegisterRequest, WorkReply, WorkerInfo};

const BIN: &str = env!("CARGO_BIN_EXE_blocktrain");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bt-net-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny run: `blocks` blocks, `rounds` rounds of `steps` local steps.
fn run_toml(
    dir: &Path,
    blocks: usize,
    rounds: u64,
    steps: i64,
    per_block: u32,
    extra: &str,
) -> PathBuf {
    let p = dir.join("run.toml");
    std::fs::write(
        &p,
        format!(
            "blocks = {blocks}\ndataset = \"shakespeare\"\n{extra}\n\
             [model]\nd_model = 32\nn_layers = 1\nn_heads = 2\nmlp_ratio = 2\nwindow = 32\ncausal = false\nt_cond = false\n\
             [training]\nrounds = {rounds}\nlocal_steps = {steps}\nbatch = 8\nworkers_per_block = {per_block}\n\
             [faults]\nlease_secs = 2.0\nround_timeout_secs = 3.0\n"
        ),
    )
    .unwrap();
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .unwrap()
}

fn coordinator(dir: &Path, port: u16, run: Option<&Path>) -> (Proc, String) {
    let state = dir.join("state");
    let _ = std::fs::remove_file(state.join("coordinator.addr"));
    let mut cmd = Command::new(BIN);
    cmd.args([
        "coordinator",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--exit-when-done",
    ])
    .arg("--state")
    .arg(&state);
    if let Some(r) = run {
        cmd.arg("--run").arg(r);
    }
    let log = log_file(dir, "coordinator.log");
    let child = cmd
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let p = Proc(child);
    wait_for(Duration::from_secs(30), "coordinator to listen", || {
        state.join("coordinator.addr").exists()
    });
    (p, url)
}

fn worker(dir: &Path, url: &str, name: &str, extra: &[&str]) -> Proc {
    let log = log_file(dir, &format!("{name}.log"));
    let child = Command::new(BIN)
        .args([
            "worker",
            "--coordinator",
            url,
            "--device",
            "cpu",
            "--threads",
            "1",
            "--retry-for",
            "60",
        ])
        .arg("--key")
        .arg(dir.join(format!("{name}.key")))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

fn status(url: &str) -> Option<Status> {
    reqwest::blocking::get(format!("{url}/v1/status"))
        .ok()?
        .json()
        .ok()
}

fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(p: &mut Proc, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < limit, "process did not exit in {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every committed (block, version, master hash, wire hash) in a state directory.
fn versions(state: &Path) -> Vec<(i64, i64, String, String)> {
    versions_where(state, "1")
}

/// The versions whose files are kept (`[faults] keep_versions`).
fn kept_versions(state: &Path) -> Vec<(i64, i64, String, String)> {
    versions_where(state, "pruned = 0")
}

fn versions_where(state: &Path, cond: &str) -> Vec<(i64, i64, String, String)> {
    let db = rusqlite::Connection::open_with_flags(
        state.join("state.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut st = db
        .prepare(&format!(
            "SELECT block, version, weights, wire FROM versions WHERE {cond} ORDER BY block, version"
        ))
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Every blob the state keeps exists and hashes to its name; the exported model holds
/// the head of every block.
fn check_state(state: &Path) {
    let all = kept_versions(state);
    for (_, _, w, x) in &all {
        for h in [w, x] {
            let bytes = std::fs::read(state.join(format!("blobs/{h}.safetensors"))).unwrap();
            assert_eq!(blake3::hash(&bytes).to_hex().as_str(), h.as_str());
        }
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("model/run.json")).unwrap()).unwrap();
    for part in manifest["parts"].as_array().unwrap() {
        let block = part["name"]
            .as_str()
            .unwrap()
            .trim_start_matches("block-")
            .parse::<i64>()
            .unwrap()
            - 1;
        let head = all
            .iter()
            .filter(|v| v.0 == block)
            .max_by_key(|v| v.1)
            .unwrap();
        assert_eq!(
            part["weights_hash"].as_str().unwrap(),
            head.2,
            "model dir follows the database"
        );
    }
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Starts a coordinator on `run` and `workers` workers, waits for the run to finish and
/// checks every one of `blocks` blocks reached `rounds` versions; returns the
/// coordinator and its URL, the workers and the final status.
fn train_to_done(
    dir: &Path,
    run: &Path,
    workers: usize,
    blocks: usize,
    rounds: u64,
) -> (Proc, String, Vec<Proc>, Status) {
    let (coord, url) = coordinator(dir, free_port(), Some(run));
    let ws: Vec<Proc> = (0..workers)
        .map(|i| worker(dir, &url, &format!("w{i}"), &[]))
        .collect();
    let mut last = None;
    wait_for(Duration::from_secs(90), "the run to finish", || {
        last = status(&url).or(last.take());
        last.as_ref().is_some_and(|s| s.done)
    });
    let s = last.unwrap();
    assert_eq!(
        s.blocks.iter().map(|b| b.version).collect::<Vec<_>>(),
        vec![rounds; blocks]
    );
    (coord, url, ws, s)
}

/// `blocktrain eval` of the coordinator's merged model in `dir/state/model`.
fn eval_merged(dir: &Path) -> std::process::Output {
    Command::new(BIN)
        .args([
            "eval",
            "--device",
            "cpu",
            "--max-windows",
            "8",
            "--checkpoint",
        ])
        .arg(dir.join("state/model"))
        .output()
        .unwrap()
}

#[test]
fn workers_train_every_block_over_http_and_bytes_are_counted() {
    let dir = scratch("happy");
    // int8 updates with error feedback, end to end.
    let run = run_toml(&dir, 2, 2, 5, 2, "[wire]\ncodec = \"int8\"");
    let (mut coord, url, mut ws, s) = train_to_done(&dir, &run, 3, 2, 2);
    assert!(s.updates["applied"] >= 4, "{:?}", s.updates);
    assert!(s.bytes_up > 0 && s.bytes_down > 0);
    assert_eq!(
        s.bytes_up,
        s.workers.iter().map(|w| w.bytes_up).sum::<u64>()
    );
    let metrics = reqwest::blocking::get(format!("{url}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("blocktrain_block_version{block=\"2\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE blocktrain_block_bytes_total counter"),
        "{metrics}"
    );
    for w in ws.iter_mut() {
        assert!(wait_exit(w, Duration::from_secs(30)).success());
    }
    assert!(wait_exit(&mut coord, Duration::from_secs(30)).success());
    assert!(
        read(&dir, "w0.log").contains("run is done"),
        "{}",
        read(&dir, "w0.log")
    );
    // The merged model is a normal run directory.
    let o = eval_merged(&dir);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("total ELBO"),
        "{o:?}"
    );
}

/// The paper's family over the network: workers train embedding-diffusion blocks, every
/// update is recomputed by the coordinator (spot checks at 100%) and matches, and the
/// merged model evaluates with the paper's CE and the bound.
#[test]
fn edm_blocks_train_over_http_and_every_lease_recomputes() {
    let dir = scratch("edm");
    let extra = "objective = \"edm\"\n[edm]\nembed_dim = 8\n[trust]\nspot_check_fraction = 1.0";
    let run = run_toml(&dir, 2, 2, 4, 1, extra);
    let (mut coord, _url, mut ws, s) = train_to_done(&dir, &run, 2, 2, 2);
    assert_eq!(
        s.updates.get("rejected").copied().unwrap_or(0),
        0,
        "{:?}",
        s.updates
    );
    for w in ws.iter_mut() {
        assert!(wait_exit(w, Duration::from_secs(30)).success());
    }
    assert!(wait_exit(&mut coord, Duration::from_secs(30)).success());
    let log = read(&dir, "coordinator.log");
    assert!(
        log.matches("passed (relative error").count() >= 4 && !log.contains("could not run"),
        "every one of the 4 updates is recomputed and matches: {log}"
    );
    let o = eval_merged(&dir);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("VDM bound") && out.contains("paper CE") && out.contains("sigma [1.000"),
        "{o:?}"
    );
}

#[test]
fn killed_worker_lease_lapses_and_the_round_completes_without_it() {
    let dir = scratch("killworker");
    // One block, two workers per round; training takes long enough (seconds, even on a
    // fast machine) to kill one mid-way.
    let run = run_toml(&dir, 1, 1, 6000, 2, "");
    let (_coord, url) = coordinator(&dir, free_port(), Some(&run));
    let mut doomed = worker(&dir, &url, "doomed", &[]);
    wait_for(Duration::from_secs(30), "a lease", || {
        status(&url).is_some_and(|s| s.blocks[0].active_leases == 1)
    });
    std::thread::sleep(Duration::from_millis(100)); // mid-training
    doomed.0.kill().unwrap();
    doomed.0.wait().unwrap();
    let _survivor = worker(&dir, &url, "survivor", &[]);
    let mut last = None;
    wait_for(Duration::from_secs(120), "the round to close", || {
        last = status(&url).or(last.take());
        last.as_ref().is_some_and(|s| s.done)
    });
    let s = last.unwrap();
    assert_eq!(s.blocks[0].version, 1);
    assert_eq!(
        s.updates["applied"], 1,
        "only the survivor's update: {:?}",
        s.updates
    );
}

#[test]
fn coordinator_killed_and_restarted_loses_no_version() {
    let dir = scratch("killcoord");
    let port = free_port();
    let run = run_toml(&dir, 1, 6, 200, 1, "");
    let (mut coord, url) = coordinator(&dir, port, Some(&run));
    let mut w = worker(&dir, &url, "w", &[]);
    let mut before = 0;
    wait_for(Duration::from_secs(60), "two committed versions", || {
        before = status(&url).map_or(0, |s| s.blocks[0].version);
        before >= 2
    });
    coord.0.kill().unwrap(); // SIGKILL: no shutdown path runs
    coord.0.wait().unwrap();
    let committed = versions(&dir.join("state"));
    std::thread::sleep(Duration::from_millis(500));
    // Restart on the same address without --run: the stored run resumes.
    let (_coord2, url2) = coordinator(&dir, port, None);
    let after = status(&url2).unwrap().blocks[0].version;
    assert!(
        after >= before,
        "version went back from {before} to {after}"
    );
    assert!(
        wait_exit(&mut w, Duration::from_secs(120)).success(),
        "{}",
        read(&dir, "w.log")
    );
    let s = status(&url2).unwrap();
    assert_eq!(s.blocks[0].version, 6);
    let log = read(&dir, "w.log");
    assert!(log.contains("cannot reach coordinator"), "{log}");
    // Every version committed before the kill is still there, unchanged.
    let now = versions(&dir.join("state"));
    assert_eq!(&now[..committed.len()], &committed[..]);
    check_state(&dir.join("state"));
}

/// A hand-made signed request: what a hostile or broken worker can send.
fn signed_post(
    url: &str,
    id: &Identity,
    path: &str,
    body: &[u8],
    tamper: bool,
) -> reqwest::blocking::Response {
    let auth = signed::sign(id, "POST", path, blocktrain_node::now_ms(), body);
    let mut body = body.to_vec();
    if tamper {
        body.push(b' ');
    }
    reqwest::blocking::Client::new()
        .post(format!("{url}{path}"))
        .header(signed::KEY_HEADER, auth.key)
        .header(signed::TIME_HEADER, auth.time_ms.to_string())
        .header(signed::NONCE_HEADER, auth.nonce)
        .header(signed::SIG_HEADER, auth.sig)
        .body(body)
        .send()
        .unwrap()
}

/// Sends a request head with `id`'s signature headers (over an empty body) declaring
/// `declared` body bytes, then `body`; returns the reply.
fn raw_post(url: &str, id: &Identity, path: &str, declared: u64, body: &[u8]) -> String {
    use std::io::Read;
    let mut tcp = TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    let a = signed::sign(id, "POST", path, blocktrain_node::now_ms(), b"");
    let sig = format!(
        "{}: {}\r\n{}: {}\r\n{}: {}\r\n{}: {}\r\n",
        signed::KEY_HEADER,
        a.key,
        signed::TIME_HEADER,
        a.time_ms,
        signed::NONCE_HEADER,
        a.nonce,
        signed::SIG_HEADER,
        a.sig
    );
    write!(
        tcp,
        "POST {path} HTTP/1.1\r\nhost: x\r\n{sig}content-length: {declared}\r\n\r\n"
    )
    .unwrap();
    tcp.write_all(body).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = vec![0u8; 4096];
    let n = tcp.read(&mut reply).unwrap_or(0);
    String::from_utf8_lossy(&reply[..n]).to_string()
}

fn info() -> WorkerInfo {
    WorkerInfo::new("cpu")
}

#[test]
fn hostile_requests_get_clear_errors_and_leave_checkpoints_intact() {
    let dir = scratch("hostile");
    let run = run_toml(&dir, 1, 1, 5, 1, "[auth]\njoin_secret = \"open sesame\"");
    let (_coord, url) = coordinator(&dir, free_port(), Some(&run));
    let weights_before = status(&url).unwrap().blocks[0].weights.clone();

    // Unsigned, and signed by a key that never registered.
    let r = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/work"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().unwrap().contains("not signed"));
    let stranger = Identity::generate();
    let body = serde_json::to_vec(&info()).unwrap();
    let r = signed_post(&url, &stranger, "/v1/work", &body, false);
    assert_eq!(r.status(), 401);
    assert!(r.text().unwrap().contains("register first"));
    // Without the join secret, and with a body that does not match its signature.
    let reg = |proof: Option<String>| {
        serde_json::to_vec(&RegisterRequest {
            info: info(),
            join_proof: proof,
        })
        .unwrap()
    };
    let r = signed_post(&url, &stranger, "/v1/register", &reg(None), false);
    assert_eq!(r.status(), 403);
    assert!(r.text().unwrap().contains("join secret"));
    let id = Identity::generate();
    let proof = Some(blocktrain_protocol::wire::join_proof(
        "open sesame",
        &id.public_hex(),
    ));
    assert_eq!(
        signed_post(&url, &id, "/v1/register", &reg(proof.clone()), true).status(),
        401
    );
    assert!(signed_post(&url, &id, "/v1/register", &reg(proof), false)
        .status()
        .is_success());

    // The same signed request sent twice: the copy is a replay.
    let replay = |auth: &signed::Auth| {
        reqwest::blocking::Client::new()
            .post(format!("{url}/v1/work"))
            .header(signed::KEY_HEADER, &auth.key)
            .header(signed::TIME_HEADER, auth.time_ms.to_string())
            .header(signed::NONCE_HEADER, &auth.nonce)
            .header(signed::SIG_HEADER, &auth.sig)
            .body(body.clone())
            .send()
            .unwrap()
    };
    let once = signed::sign(&id, "POST", "/v1/work", blocktrain_node::now_ms(), &body);
    assert!(replay(&once).status().is_success());
    let r = replay(&once);
    assert_eq!(r.status(), 401);
    assert!(r.text().unwrap().contains("replayed"));
    let lease: Lease = match signed_post(&url, &id, "/v1/work", &body, false)
        .json()
        .unwrap()
    {
        WorkReply::Lease(l) => l,
        other => panic!("{other:?}"),
    };
    let path = format!("/v1/updates/{}", lease.id);
    // Garbage, a bad signature, an oversized declared body, and an upload cut off mid-way.
    let r = signed_post(&url, &id, &path, b"not safetensors", false);
    assert_eq!(r.status(), 422);
    assert_eq!(signed_post(&url, &id, &path, b"x", true).status(), 401);
    let reply = raw_post(&url, &id, &path, 999_999_999, &[0u8; 16]);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // The uploader dies mid-body: 1000 of 100000 bytes, then the connection closes.
    let mut tcp = TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    let a = signed::sign(&id, "POST", &path, blocktrain_node::now_ms(), b"");
    write!(
        tcp,
        "POST {path} HTTP/1.1\r\nhost: x\r\n{}: {}\r\n{}: {}\r\n{}: {}\r\n{}: {}\r\ncontent-length: 100000\r\n\r\n",
        signed::KEY_HEADER, a.key, signed::TIME_HEADER, a.time_ms, signed::NONCE_HEADER, a.nonce, signed::SIG_HEADER, a.sig
    )
    .unwrap();
    tcp.write_all(&[7u8; 1000]).unwrap();
    drop(tcp);

    let mut reasons = Vec::new();
    wait_for(Duration::from_secs(10), "four recorded rejections", || {
        reasons = status(&url)
            .unwrap()
            .recent
            .iter()
            .filter_map(|u| u.reason.clone())
            .collect();
        reasons.len() >= 4
    });
    let all = reasons.join("\n");
    for needle in [
        "safetensors",
        "signature",
        "exceeds the limit",
        "interrupted",
    ] {
        assert!(
            all.contains(needle),
            "no rejection mentions '{needle}':\n{all}"
        );
    }
    let s = status(&url).unwrap();
    assert_eq!(
        s.blocks[0].weights, weights_before,
        "stored checkpoint untouched"
    );
    assert_eq!(s.blocks[0].version, 0);

    // A real worker without the secret is refused with a message that says so.
    let mut w = worker(&dir, &url, "nosecret", &[]);
    assert!(!wait_exit(&mut w, Duration::from_secs(30)).success());
    assert!(read(&dir, "nosecret.log").contains("join secret"));
    // With it, the run completes.
    let mut w = worker(&dir, &url, "member", &["--join-secret", "open sesame"]);
    assert!(
        wait_exit(&mut w, Duration::from_secs(60)).success(),
        "{}",
        read(&dir, "member.log")
    );
}

/// Trains a 2-block tiny run to the end with two honest workers and the given extra
/// (malicious) workers; returns the state directory and the valid CE of the result.
fn trust_run(name: &str, attackers: &[&str]) -> (PathBuf, f64) {
    let dir = scratch(name);
    // fp32 updates (no error-feedback residue), one worker per block and round: the
    // honest trajectory does not depend on who else asked for work, so the attacked
    // run can be compared with the clean one. Every update is spot-checked.
    let run = run_toml(
        &dir,
        2,
        3,
        20,
        1,
        "[trust]\nspot_check_fraction = 1.0\nscreen_windows = 32\n[wire]\ncodec = \"fp32\"\n",
    );
    let (mut coord, url) = coordinator(&dir, free_port(), Some(&run));
    // The attackers go first, so each of them is scheduled and refused (a failed spot
    // check bars a worker at once; after 3 other refusals in a row a worker gives up);
    // then the honest workers train the run.
    for (i, m) in attackers.iter().enumerate() {
        let cache = dir.join(format!("cx{i}"));
        let mut bad = worker(
            &dir,
            &url,
            &format!("attacker-{i}"),
            &["--malice", m, "--cache", cache.to_str().unwrap()],
        );
        let s = wait_exit(&mut bad, Duration::from_secs(60));
        assert!(
            !s.success(),
            "attacker {m} should have been refused and given up"
        );
    }
    let mut honest = [
        worker(
            &dir,
            &url,
            "honest-a",
            &["--cache", dir.join("ca").to_str().unwrap()],
        ),
        worker(
            &dir,
            &url,
            "honest-b",
            &["--cache", dir.join("cb").to_str().unwrap()],
        ),
    ];
    for w in honest.iter_mut() {
        assert!(wait_exit(w, Duration::from_secs(120)).success());
    }
    assert!(wait_exit(&mut coord, Duration::from_secs(30)).success());
    let json = dir.join("eval.json");
    let out = Command::new(BIN)
        .args([
            "eval",
            "--split",
            "valid",
            "--max-windows",
            "300",
            "--samples",
            "1",
            "--seed",
            "1234",
            "--threads",
            "1",
        ])
        .arg("--checkpoint")
        .arg(dir.join("state/model"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let ce = v["results"][0]["report"]["nats"].as_f64().unwrap();
    (dir, ce)
}

#[test]
fn malicious_workers_are_refused_with_receipts_and_do_not_change_the_model() {
    let (_clean, clean_ce) = trust_run("trust-clean", &[]);
    let (dir, attacked_ce) = trust_run("trust-attacked", &["flip", "random", "scale:3"]);
    eprintln!("valid CE: {clean_ce:.5} clean, {attacked_ce:.5} with sign-flipping, random-noise and x3 workers");
    assert!(
        (attacked_ce - clean_ce).abs() < 0.01,
        "CE {attacked_ce} with attackers vs {clean_ce} without"
    );
    // The ledger holds a signed receipt for every decision and verifies offline.
    let state = dir.join("state");
    let out = Command::new(BIN)
        .args(["ledger", "verify", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = rusqlite::Connection::open(state.join("state.sqlite")).unwrap();
    let receipts: Vec<String> = db
        .prepare("SELECT receipt FROM ledger ORDER BY idx")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let keys: Vec<String> = ["attacker-0", "attacker-1", "attacker-2"]
        .iter()
        .map(|n| read(&dir, &format!("{n}.log")))
        .map(|log| {
            let at = log.find("(public ").expect("key line") + 8;
            log[at..at + 64].to_string()
        })
        .collect();
    let mut refused = vec![0; keys.len()];
    for r in &receipts {
        let v: serde_json::Value = serde_json::from_str(r).unwrap();
        if let Some(k) = keys.iter().position(|k| v["claim"]["worker"] == k.as_str()) {
            assert_eq!(v["decision"]["accepted"], false, "{v}");
            let reason = v["decision"]["reason"].as_str().unwrap();
            assert!(
                reason.contains("spot check")
                    || reason.contains("held-out screening")
                    || reason.contains("delta RMS"),
                "{reason}"
            );
            refused[k] += 1;
        }
    }
    // Every refusal an attacker was told of is on record; none was ever accepted.
    for (i, n) in refused.iter().enumerate() {
        let told = read(&dir, &format!("attacker-{i}.log"))
            .matches("update refused")
            .count();
        assert!(
            *n >= told && told >= 1,
            "attacker-{i}: {n} receipts, {told} refusals it was told of"
        );
    }
    // Each honest worker checked its own receipts' inclusion proofs at the end.
    for w in ["honest-a", "honest-b"] {
        let log = read(&dir, &format!("{w}.log"));
        assert!(log.contains("proven in the log of size"), "{log}");
    }
}

#[test]
fn doctor_checks_the_coordinator_clock_and_reachability_and_names_failures() {
    let dir = scratch("doctor");
    let run = run_toml(&dir, 1, 1, 1, 1, "");
    let (_coord, url) = coordinator(&dir, free_port(), Some(&run));
    let port = free_port();
    let out = Command::new(BIN)
        .args(["doctor", "--coordinator", &url, "--dir"])
        .arg(&dir)
        .args(["--public-addr", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for check in ["memory", "disk", "coordinator", "clock", "public address"] {
        assert!(text.contains(&format!("ok    {check}")), "{check}: {text}");
    }
    // A coordinator that is not there, and an impossible disk demand: each named, exit 1.
    let out = Command::new(BIN)
        .args([
            "doctor",
            "--coordinator",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .args(["--min-disk-gb", "1000000"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL  coordinator") && text.contains("does not answer"),
        "{text}"
    );
    assert!(text.contains("FAIL  disk"), "{text}");
}

#[test]
fn testnet_trains_and_serves_under_seeded_faults_and_its_invariants_hold() {
    let dir = scratch("testnet");
    let json = dir.join("testnet.json");
    let out = Command::new(BIN)
        .args([
            "testnet",
            "--seed",
            "3",
            "--rounds",
            "3",
            "--requests",
            "6",
            "--device",
            "cpu",
        ])
        .arg("--out")
        .arg(dir.join("net"))
        .arg("--json")
        .arg(&json)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("all invariants hold"), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let events = v["events"].as_array().unwrap();
    assert!(events.len() >= 3, "faults were injected: {events:?}");
    assert_eq!(v["inference"]["failed_unnamed"], 0);
    assert!(
        events
            .iter()
            .any(|e| e.as_str().unwrap().contains("connections were cut")),
        "{events:?}"
    );
}
