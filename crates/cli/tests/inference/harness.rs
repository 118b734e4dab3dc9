//! The inference tests' harness: tiny trained models, block servers started as a user
//! starts them, local and routed generation.
pub use std::io::{BufRead, BufReader, Read, Write};
pub use std::net::TcpStream;
pub use std::path::{Path, PathBuf};
pub use std::process::{Child, Command, Output, Stdio};
pub use std::time::Duration;

pub use blocktrain_protocol::frame::{
    decode_frame, ArPayload, ArSetup, ArStepMeta, DenoiseMeta, ErrorCode, Message, Sampling, Stage,
    DEFAULT_MAX_FRAME, MAGIC, MASK_TOKEN,
};
pub use blocktrain_serve::client::{self, Request};
pub use blocktrain_serve::hop::HopLimits;

pub const BIN: &str = env!("CARGO_BIN_EXE_blocktrain");

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bt-inf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn bt(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run blocktrain")
}

pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Trains a tiny model: `objective` block or edm (4 blocks), or ar (3 layers).
pub fn train(dir: &Path, objective: &str) -> PathBuf {
    let out = dir.join(objective);
    let blocks = if objective == "ar" { "3" } else { "4" };
    let mut args = vec![
        "train",
        "--profile",
        "tiny",
        "--steps",
        "8",
        "--data",
        "shakespeare",
        "--objective",
        objective,
        "--blocks",
        blocks,
        "--out",
        out.to_str().unwrap(),
        "--threads",
        "1",
    ];
    if objective == "edm" {
        args.extend(["--embed-dim", EMBED_DIM_ARG]);
    }
    ok(&bt(&args));
    out
}

/// The tiny embedding-diffusion models' latent width.
pub const EMBED_DIM: usize = 16;
pub const EMBED_DIM_ARG: &str = "16";

/// Passes a server has computed, as it reports them.
pub fn served(addr: &str) -> u64 {
    rt().block_on(client::server_info(addr, &HopLimits::default()))
        .unwrap()
        .served
}

pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn signal(&self, sig: &str) {
        let s = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(s.success());
    }
}

pub fn serve(dir: &Path, checkpoint: &Path, blocks: &str) -> Server {
    serve_with(dir, checkpoint, blocks, &[])
}

pub fn serve_with(dir: &Path, checkpoint: &Path, blocks: &str, extra: &[&str]) -> Server {
    let log =
        std::fs::File::create(dir.join(format!("serve-{blocks}-{}.log", rand_suffix()))).unwrap();
    let child = Command::new(BIN)
        .args([
            "serve",
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--blocks",
            blocks,
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--keepalive-ms",
            "100",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    started(child, "serving")
}

/// A process that announces itself with one stdout line starting `first`, its address
/// the last word (`serve`, `gateway`).
pub fn started(mut child: Child, first: &str) -> Server {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|_| line.starts_with(first))
        .unwrap_or_else(|| panic!("{first}: did not start: {line:?}"))
        .to_string();
    Server { child, addr }
}

pub fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

pub fn generate_local(ckpt: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "generate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    ok(&bt(&args))
}

pub fn generate_route(route: &str, extra: &[&str]) -> Output {
    let mut args = vec!["generate", "--route", route];
    args.extend_from_slice(extra);
    bt(&args)
}

pub const GEN: [&str; 8] = [
    "--prompt",
    "ROMEO: ",
    "--len",
    "24",
    "--seed",
    "7",
    "--steps-per-block",
    "6",
];

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn request() -> Request {
    Request {
        prompt: b"ROMEO: ".to_vec(),
        len: 24,
        sampling: Sampling {
            steps_per_block: 6,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            heun: false,
        },
        seed: 7,
    }
}

pub fn other_kill(s: &Server) {
    s.signal("-KILL");
    std::thread::sleep(Duration::from_millis(200));
}

/// Sends raw bytes, returns the frame the server answers with (after its greeting and
/// any keepalives).
pub fn raw(addr: &str, bytes: &[u8]) -> Message {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // Every whole frame received so far, in order.
        while reply.len() >= 16 {
            let len =
                |at: usize| u32::from_le_bytes(reply[at..at + 4].try_into().unwrap()) as usize;
            let total = 16 + len(8) + len(12);
            if reply.len() < total {
                break;
            }
            let m = decode_frame(&reply[..total], DEFAULT_MAX_FRAME).expect("a reply frame");
            reply.drain(..total);
            if !matches!(m, Message::Keepalive | Message::Greeting(_)) {
                return m;
            }
        }
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(n > 0, "connection closed with no reply frame");
        reply.extend_from_slice(&buf[..n]);
    }
}

pub fn expect_error(m: Message, code: ErrorCode, needle: &str) {
    match m {
        Message::Error(e) => {
            assert_eq!(e.code, code, "{e:?}");
            assert!(
                e.message.contains(needle),
                "{:?} lacks {needle:?}",
                e.message
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

pub fn meta(model: &str, blocks: &str, addr: &str) -> DenoiseMeta {
    DenoiseMeta {
        request_id: 1,
        model_id: model.into(),
        sampling: Sampling {
            steps_per_block: 2,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            heun: false,
        },
        seed: 0,
        route: vec![Stage {
            blocks: blocks.parse().unwrap(),
            replicas: vec![addr.into()],
        }],
        hop: 0,
        hops: vec![],
    }
}
