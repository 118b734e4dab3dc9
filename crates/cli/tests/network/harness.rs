//! What every network test shares: scratch directories, run files, the coordinator and
//! worker processes as a user starts them, and waits on their status. Its imports are
//! re-exported so each test module starts from `use super::harness::*`.
pub use std::io::Write;
pub use std::net::{TcpListener, TcpStream};
pub use std::path::{Path, PathBuf};
pub use std::process::{Child, Command, Stdio};
pub use std::time::{Duration, Instant};

pub use blocktrain_protocol::identity::Identity;
pub use blocktrain_protocol::signed;
pub use blocktrain_protocol::wire::{Lease, RegisterRequest, WorkReply, WorkerInfo};
pub use blocktrain_train::coordinator::Status;

pub const BIN: &str = env!("CARGO_BIN_EXE_blocktrain");

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bt-net-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny run: `blocks` blocks, `rounds` rounds of `steps` local steps.
pub fn run_toml(
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

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .unwrap()
}

pub fn coordinator(dir: &Path, port: u16, run: Option<&Path>) -> (Proc, String) {
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

pub fn worker(dir: &Path, url: &str, name: &str, extra: &[&str]) -> Proc {
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

pub fn status(url: &str) -> Option<Status> {
    reqwest::blocking::get(format!("{url}/v1/status"))
        .ok()?
        .json()
        .ok()
}

pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn wait_exit(p: &mut Proc, limit: Duration) -> std::process::ExitStatus {
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
pub fn versions(state: &Path) -> Vec<(i64, i64, String, String)> {
    versions_where(state, "1")
}

/// The versions whose files are kept (`[faults] keep_versions`).
pub fn kept_versions(state: &Path) -> Vec<(i64, i64, String, String)> {
    versions_where(state, "pruned = 0")
}

pub fn versions_where(state: &Path, cond: &str) -> Vec<(i64, i64, String, String)> {
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
pub fn check_state(state: &Path) {
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

pub fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Starts a coordinator on `run` and `workers` workers, waits for the run to finish and
/// checks every one of `blocks` blocks reached `rounds` versions; returns the
/// coordinator and its URL, the workers and the final status.
pub fn train_to_done(
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
pub fn eval_merged(dir: &Path) -> std::process::Output {
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
