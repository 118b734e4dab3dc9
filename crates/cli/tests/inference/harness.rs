//! Inference across hosts with real processes on loopback: block servers started as a
//! user starts them, a request crossing them once, replicas stalled and killed, and
//! hostile frames sent by hand.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use blocktrain_protocol::frame::{
    decode_frame, ArPayload, ArSetup, ArStepMeta, DenoiseMeta, ErrorCode, Message, Sampling, Stage,
    DEFAULT_MAX_FRAME, MAGIC, MASK_TOKEN,
};
use blocktrain_serve::client::{self, Request};
use blocktrain_serve::hop::HopLimits;

const BIN: &str = env!("CARGO_BIN_EXE_blocktrain");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bt-inf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn bt(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run blocktrain")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Trains a tiny model: `objective` block or edm (4 blocks), or ar (3 layers).
fn train(dir: &Path, objective: &str) -> PathBuf {
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
const EMBED_DIM: usize = 16;
const EMBED_DIM_ARG: &str = "16";

/// Passes a server has computed, as it reports them.
fn served(addr: &str) -> u64 {
    rt().block_on(client::server_info(addr, &HopLimits::default()))
        .unwrap()
        .served
}

struct Server {
    child: Child,
    addr: String,
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
    fn signal(&self, sig: &str) {
        let s = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(s.success());
    }
}

fn serve(dir: &Path, checkpoint: &Path, blocks: &str) -> Server {
    serve_with(dir, checkpoint, blocks, &[])
}

fn serve_with(dir: &Path, checkpoint: &Path, blocks: &str, extra: &[&str]) -> Server {
    let log =
        std::fs::File::create(dir.join(format!("serve-{blocks}-{}.log", rand_suffix()))).unwrap();
    let mut child = Command::new(BIN)
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
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|_| line.starts_with("serving"))
        .unwrap_or_else(|| panic!("server did not start: {line:?}"))
        .to_string();
    Server { child, addr }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn generate_local(ckpt: &Path, extra: &[&str]) -> String {
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

fn generate_route(route: &str, extra: &[&str]) -> Output {
    let mut args = vec!["generate", "--route", route];
    args.extend_from_slice(extra);
    bt(&args)
}

const GEN: [&str; 8] = [
    "--prompt",
    "ROMEO: ",
    "--len",
    "24",
    "--seed",
    "7",
    "--steps-per-block",
    "6",
];

#[test]
fn one_traversal_over_two_servers_matches_local_generation() {
    let dir = scratch("match");
    let ckpt = train(&dir, "block");
    let top = serve(&dir, &ckpt, "3..4");
    let bottom = serve(&dir, &ckpt, "1..2");
    let local = generate_local(&ckpt, &GEN);
    // The route file lists servers in any order; what each hosts is asked over the wire.
    let route = dir.join("route.txt");
    std::fs::write(
        &route,
        format!("# servers\n{}\n{}\n", bottom.addr, top.addr),
    )
    .unwrap();
    let out = generate_route(route.to_str().unwrap(), &GEN);
    assert_eq!(
        ok(&out),
        local,
        "the block stack across servers samples what one host samples"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 traversal"), "{err}");
    assert!(err.contains("3..4") && err.contains("1..2"), "{err}");
    // Counted by the servers: each computed once for that request. What crossed the one
    // hop between them was a byte per position plus the mask bitmap.
    assert_eq!((served(&top.addr), served(&bottom.addr)), (1, 1));
    let g = rt()
        .block_on(async {
            let limits = HopLimits::default();
            let plan = client::discover(&[top.addr.clone(), bottom.addr.clone()], &limits).await?;
            client::generate(&plan, &request(), &limits).await
        })
        .unwrap();
    assert_eq!(g.traversals, 1);
    assert_eq!((served(&top.addr), served(&bottom.addr)), (2, 2));
    let n: usize = 7 + 24;
    assert_eq!(g.hops[0].bytes_out, (n + n.div_ceil(8)) as u64);
    assert_eq!(g.hops[1].bytes_out, 0, "the last stage sends nothing on");

    // A route that misses blocks is refused before anything is sent, naming them.
    let out = generate_route(&top.addr, &GEN);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no server hosts blocks 1..2"), "{err}");
}

/// The paper's family across servers: the latent z crosses the hop as f16 (T x e values
/// at the boundary's sigma), one host and the route sample the same bytes, the servers
/// count one pass each, and the gateway serves it too.
#[test]
fn edm_blocks_across_two_servers_hand_on_the_latent_once() {
    let dir = scratch("edm");
    let ckpt = train(&dir, "edm");
    let top = serve(&dir, &ckpt, "3..4");
    let bottom = serve(&dir, &ckpt, "1..2");
    let route = format!("{},{}", bottom.addr, top.addr);
    let local = generate_local(&ckpt, &GEN);
    let out = generate_route(&route, &GEN);
    assert_eq!(ok(&out), local, "the route samples what one host samples");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 traversal"), "{err}");
    let heun: Vec<&str> = GEN.iter().copied().chain(["--heun"]).collect();
    assert_eq!(
        ok(&generate_route(&route, &heun)),
        generate_local(&ckpt, &heun)
    );
    assert_eq!((served(&top.addr), served(&bottom.addr)), (2, 2));
    let g = rt()
        .block_on(async {
            let limits = HopLimits::default();
            let plan = client::discover(&[top.addr.clone(), bottom.addr.clone()], &limits).await?;
            assert_eq!(plan.family, "edm");
            client::generate(&plan, &request(), &limits).await
        })
        .unwrap();
    assert_eq!(g.output.len(), 24);
    assert_eq!(g.traversals, 1);
    let n: usize = 7 + 24;
    assert_eq!(
        g.hops[0].bytes_out,
        (n + n.div_ceil(8) + 2 * n * EMBED_DIM) as u64,
        "tokens + mask + an f16 latent of {n} x {EMBED_DIM}"
    );
    // A latent sent to the top stage, or none to a lower one, is refused.
    let info = match raw(&bottom.addr, &Message::Info.encode()) {
        Message::ServerInfo(i) => i,
        other => panic!("{other:?}"),
    };
    assert_eq!(info.family, "edm");
    let tokens: Vec<u16> = b"Hi"
        .iter()
        .map(|&b| b as u16)
        .chain([MASK_TOKEN; 6])
        .collect();
    let mut m = meta(&info.model_id, "1..2", &bottom.addr);
    m.route.insert(
        0,
        Stage {
            blocks: "3..4".parse().unwrap(),
            replicas: vec![top.addr.clone()],
        },
    );
    m.hop = 1;
    expect_error(
        raw(
            &bottom.addr,
            &Message::Denoise(m.clone(), tokens.clone()).encode(),
        ),
        ErrorCode::BadRequest,
        "continue from a latent",
    );
    let z = blocktrain_protocol::frame::LatentState {
        width: EMBED_DIM as u32,
        sigma: 10.0,
        values: vec![0.0; tokens.len() * EMBED_DIM],
    };
    let mut to_top = m.clone();
    to_top.hop = 0;
    expect_error(
        raw(
            &top.addr,
            &Message::Latent(to_top, tokens.clone(), z.clone()).encode(),
        ),
        ErrorCode::BadRequest,
        "takes no latent",
    );
    // A latent at another level than where this stage starts is refused too.
    let wrong = blocktrain_protocol::frame::LatentState { sigma: 7.0, ..z };
    expect_error(
        raw(&bottom.addr, &Message::Latent(m, tokens, wrong).encode()),
        ErrorCode::BadRequest,
        "start at sigma",
    );
    let gateway = start_gateway(&route);
    let http = reqwest::blocking::Client::new();
    let body = serde_json::json!({"prompt": "ROMEO: ", "max_tokens": 10, "seed": 3});
    let r = http.post(&gateway.addr).json(&body).send().unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 10);
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn request() -> Request {
    Request {
        prompt: b"ROMEO: ".to_vec(),
        len: 24,
        sampling: Sampling {
            steps_per_block: 6,
            temperature: 1.0,
            top_k: 0,
            heun: false,
        },
        seed: 7,
    }
}

#[test]
fn stalled_and_dead_replicas_are_skipped_and_the_last_failure_names_the_blocks() {
    let dir = scratch("faults");
    let ckpt = train(&dir, "block");
    // The top stage gives up on a silent replica after 1.5 s.
    let top = serve_with(&dir, &ckpt, "3..4", &["--stall-timeout", "1.5"]);
    let first = serve(&dir, &ckpt, "1..2");
    let second = serve(&dir, &ckpt, "1..2");
    let limits = HopLimits {
        stall_timeout: Duration::from_millis(1500),
        ..HopLimits::default()
    };
    let servers = vec![top.addr.clone(), first.addr.clone(), second.addr.clone()];
    let rt = rt();
    let plan = rt.block_on(client::discover(&servers, &limits)).unwrap();
    assert_eq!(plan.stages.len(), 2);
    assert_eq!(
        plan.stages[1].replicas.len(),
        2,
        "two replicas of blocks 1..2"
    );
    let healthy = rt
        .block_on(client::generate(&plan, &request(), &limits))
        .unwrap();
    assert_eq!(healthy.hops[0].failovers, 0);

    // Whichever replica is tried first stalls (stopped: the kernel still accepts its
    // connections, nothing answers). The top stage gives up on it and uses the other.
    let tried_first = plan.stages[1].replicas[0].clone();
    let (stalled, other) = if tried_first == first.addr {
        (&first, &second)
    } else {
        (&second, &first)
    };
    stalled.signal("-STOP");
    let g = rt
        .block_on(client::generate(&plan, &request(), &limits))
        .unwrap();
    assert_eq!(
        g.output, healthy.output,
        "the replica computes the same bytes"
    );
    assert_eq!(g.hops[0].failovers, 1, "{:?}", g.hops);
    assert_eq!(g.hops[1].server, other.addr);

    // With the other replica dead too, the error names the blocks nobody served.
    other_kill(other);
    let e = rt
        .block_on(client::generate(&plan, &request(), &limits))
        .unwrap_err()
        .to_string();
    assert!(e.contains("blocks 1..2"), "{e}");
    assert!(e.contains("stalled") && e.contains("connect"), "{e}");
    // The top server is fine after all that.
    let info = rt.block_on(client::discover(std::slice::from_ref(&top.addr), &limits));
    assert!(info
        .unwrap_err()
        .to_string()
        .contains("no server hosts blocks 1..2"));
}

fn other_kill(s: &Server) {
    s.signal("-KILL");
    std::thread::sleep(Duration::from_millis(200));
}

/// Sends raw bytes, returns the frame the server answers with.
fn raw(addr: &str, bytes: &[u8]) -> Message {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if let Ok(m) = decode_frame(&reply, DEFAULT_MAX_FRAME) {
            if m != Message::Keepalive {
                return m;
            }
            reply.clear();
        }
    }
    decode_frame(&reply, DEFAULT_MAX_FRAME).expect("a reply frame")
}

fn expect_error(m: Message, code: ErrorCode, needle: &str) {
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

#[test]
fn hostile_frames_get_errors_and_the_server_keeps_serving() {
    let dir = scratch("hostile");
    let ckpt = train(&dir, "block");
    let s = serve(&dir, &ckpt, "1..4");
    let info = match raw(&s.addr, &Message::Info.encode()) {
        Message::ServerInfo(i) => i,
        other => panic!("{other:?}"),
    };
    assert_eq!((info.total, info.blocks.first, info.blocks.last), (4, 1, 4));

    expect_error(
        raw(&s.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ErrorCode::BadRequest,
        "magic",
    );
    let mut huge = Message::Info.encode();
    huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_error(raw(&s.addr, &huge), ErrorCode::BadRequest, "exceeds");
    let mut future = Message::Info.encode();
    future[4] = 2;
    expect_error(raw(&s.addr, &future), ErrorCode::BadRequest, "version 2");
    // A frame cut off mid-payload, then the connection dropped.
    {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        let f = Message::Denoise(
            meta(&info.model_id, "1..4", &s.addr),
            vec![1, 2, MASK_TOKEN],
        )
        .encode();
        c.write_all(&f[..f.len() - 2]).unwrap();
    }

    let tokens = vec![b'a' as u16, MASK_TOKEN, MASK_TOKEN];
    let m = meta("not-this-model", "1..4", &s.addr);
    expect_error(
        raw(&s.addr, &Message::Denoise(m, tokens.clone()).encode()),
        ErrorCode::Mismatch,
        "model",
    );
    let m = meta(&info.model_id, "1..2", &s.addr);
    expect_error(
        raw(&s.addr, &Message::Denoise(m, tokens.clone()).encode()),
        ErrorCode::Mismatch,
        "hosts blocks 1..4",
    );
    let mut m = meta(&info.model_id, "1..4", &s.addr);
    m.sampling.temperature = -1.0;
    expect_error(
        raw(&s.addr, &Message::Denoise(m, tokens.clone()).encode()),
        ErrorCode::BadRequest,
        "temperature",
    );
    let m = meta(&info.model_id, "1..4", &s.addr);
    let long = vec![MASK_TOKEN; 5000];
    expect_error(
        raw(&s.addr, &Message::Denoise(m, long).encode()),
        ErrorCode::BadRequest,
        "tokens",
    );
    assert!(matches!(
        raw(
            &s.addr,
            &[MAGIC.as_slice(), &[1, 0, 5, 0], &[0; 8]].concat()
        ),
        Message::Error(_)
    ));

    // Block numbers out of range never get as far as the route check.
    let bytes = Message::Denoise(meta(&info.model_id, "1..4", &s.addr), tokens.clone()).encode();
    let meta_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let (head, rest) = bytes.split_at(16);
    let (json, body) = rest.split_at(meta_len);
    let json = String::from_utf8(json.to_vec())
        .unwrap()
        .replace(r#""last":4"#, r#""last":4294967295"#);
    let mut bytes = head.to_vec();
    bytes[8..12].copy_from_slice(&(json.len() as u32).to_le_bytes());
    bytes.extend_from_slice(json.as_bytes());
    bytes.extend_from_slice(body);
    expect_error(raw(&s.addr, &bytes), ErrorCode::BadRequest, "block range");
    // An AR step to a diffusion server is refused, not misread.
    let m = meta(&info.model_id, "1..4", &s.addr);
    let ar = Message::ArStep(
        ArStepMeta {
            session: 1,
            output_index: 0,
            hidden: Some((1, 16)),
            setup: Some(ArSetup {
                model_id: info.model_id.clone(),
                sampling: m.sampling,
                seed: 0,
                route: m.route,
                hop: 0,
            }),
        },
        ArPayload::Hidden(vec![0.5; 16]),
    );
    expect_error(
        raw(&s.addr, &ar.encode()),
        ErrorCode::BadRequest,
        "diffusion blocks",
    );

    // After all that, a good request still works.
    let m = meta(&info.model_id, "1..4", &s.addr);
    match raw(&s.addr, &Message::Denoise(m, tokens).encode()) {
        Message::Result(_, bytes) => assert_eq!(bytes.len(), 3),
        other => panic!("{other:?}"),
    }
    assert!(s.addr.contains("127.0.0.1"));
}

fn meta(model: &str, blocks: &str, addr: &str) -> DenoiseMeta {
    DenoiseMeta {
        request_id: 1,
        model_id: model.into(),
        sampling: Sampling {
            steps_per_block: 2,
            temperature: 1.0,
            top_k: 0,
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

#[test]
fn ar_pipeline_over_three_servers_matches_local_greedy_generation() {
    let dir = scratch("ar");
    let ckpt = train(&dir, "ar");
    let servers: Vec<Server> = ["1", "2", "3"]
        .iter()
        .map(|l| serve(&dir, &ckpt, l))
        .collect();
    let route: Vec<&str> = servers.iter().map(|s| s.addr.as_str()).collect();
    let route = route.join(",");
    // 48 bytes after a 7-byte prompt outgrow the window of 32: the session restarts from
    // the last 16 ids twice, as local generation rebuilds its cache.
    let greedy = ["--prompt", "ROMEO: ", "--len", "48", "--top-k", "1"];
    let local = generate_local(&ckpt, &greedy);
    let out = generate_route(&route, &greedy);
    assert_eq!(ok(&out), local);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("48 traversals"), "{err}");
    for s in &servers {
        assert_eq!(served(&s.addr), 48, "one pass of every stage per byte");
    }

    // The AR baseline keeps its KV caches on the servers, so it cannot fail over: a dead
    // middle stage is a clear error naming its layers.
    servers[1].signal("-KILL");
    std::thread::sleep(Duration::from_millis(200));
    let out = generate_route(&route, &greedy);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2..2"), "{err}");
}

/// `blocktrain gateway` in front of `route`, 4 steps per block; its address is the
/// completions URL it prints.
fn start_gateway(route: &str) -> Server {
    let mut child = Command::new(BIN)
        .args([
            "gateway",
            "--route",
            route,
            "--listen",
            "127.0.0.1:0",
            "--steps-per-block",
            "4",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let gateway = Server {
        addr: line.trim().rsplit(' ').next().unwrap().to_string(),
        child,
    };
    assert!(gateway.addr.ends_with("/v1/completions"), "{line}");
    gateway
}

#[test]
fn openai_style_completions_go_through_the_gateway() {
    let dir = scratch("gateway");
    let ckpt = train(&dir, "block");
    let top = serve(&dir, &ckpt, "3..4");
    let bottom = serve(&dir, &ckpt, "1..2");
    let route = format!("{},{}", top.addr, bottom.addr);
    let gateway = start_gateway(&route);
    let http = reqwest::blocking::Client::new();
    let body =
        serde_json::json!({"prompt": "ROMEO: ", "max_tokens": 12, "temperature": 0.8, "seed": 3});
    let r = http.post(&gateway.addr).json(&body).send().unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["prompt_tokens"], 7);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // The same seed through the gateway samples what generate --route samples.
    let direct = generate_route(
        &route,
        &[
            "--prompt",
            "ROMEO: ",
            "--len",
            "12",
            "--temperature",
            "0.8",
            "--seed",
            "3",
            "--steps-per-block",
            "4",
        ],
    );
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(ok(&direct), format!("ROMEO: {text}\n"));
    // Bad requests get a 400 with an OpenAI-style error body.
    let r = http
        .post(&gateway.addr)
        .json(&serde_json::json!({"prompt": "x", "max_tokens": 100000}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("positions"),
        "{v}"
    );
}

#[test]
fn a_replica_killed_mid_request_is_replaced_and_the_request_completes() {
    let dir = scratch("midkill");
    let ckpt = train(&dir, "block");
    let top = serve(&dir, &ckpt, "3..4");
    let a = serve(&dir, &ckpt, "1..2");
    let b = serve(&dir, &ckpt, "1..2");
    let limits = HopLimits::default();
    let servers = vec![top.addr.clone(), a.addr.clone(), b.addr.clone()];
    let rt = rt();
    let plan = rt.block_on(client::discover(&servers, &limits)).unwrap();
    // A long output and many steps, so that blocks 1..2 compute for a while (a step
    // that reveals nothing is skipped, hence both).
    let mut req = request();
    req.len = 600;
    req.sampling.steps_per_block = 600;
    let expected = rt.block_on(client::generate(&plan, &req, &limits)).unwrap();
    let busy = if plan.stages[1].replicas[0] == a.addr {
        &a
    } else {
        &b
    };
    let worker = std::thread::spawn({
        let (plan, req, limits) = (plan.clone(), req.clone(), limits.clone());
        move || rt.block_on(client::generate(&plan, &req, &limits))
    });
    // Wait until the request has reached blocks 1..2 (top's share is done), then kill.
    // Killed a little early instead (still computing the top), the replica is refused at
    // connect: a failover either way. The kill lands 40% into blocks 1..2's compute as
    // measured on this machine, so it is not too late on a faster one either.
    let (top_s, bottom_s) = (
        expected.hops[0].compute_ms / 1e3,
        expected.hops[1].compute_ms / 1e3,
    );
    std::thread::sleep(Duration::from_secs_f64(top_s + 0.4 * bottom_s));
    busy.signal("-KILL");
    let g = worker.join().unwrap().unwrap();
    assert_eq!(g.output, expected.output);
    assert_eq!(g.hops[0].failovers, 1, "{:?}", g.hops);
}
