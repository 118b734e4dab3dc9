//! A block server batches concurrent diffusion requests: counted by the server, each
//! request's bytes the same as computed alone, buckets by length, caps kept. And an
//! ignored bench: requests/s of 1, 4 and 8 concurrent clients, batching on and off
//! (`cargo nextest run -p blocktrain-serve --test batching --run-ignored only`).
use std::time::{Duration, Instant};

use blocktrain_model::logical::LogicalShape;
use blocktrain_protocol::frame::{DenoiseMeta, Message, Sampling, ServerInfo, Stage, MASK_TOKEN};
use blocktrain_serve::framed::{read_message, write_message};
use blocktrain_serve::hosted::{Hosted, Source};
use blocktrain_serve::server::{self, BatchOptions, Caps, ServeOptions};
use tokio::net::TcpStream;

const MASKED: &str = "d=32,layers=2,heads=2,dtype=f32,window=16";
const EDM: &str = "d=32,layers=2,heads=2,dtype=f32,window=16,embed=8";

/// A server of both blocks of a 2-block logical model; returns its address and model.
fn start(shape: &str, batch: BatchOptions, caps: Caps) -> (String, String) {
    let shape: LogicalShape = shape.parse().unwrap();
    let source = Source::Logical {
        shape: &shape,
        ar: false,
        total: 2,
        seed: 1,
        block_layers: None,
    };
    let hosted = Hosted::load(source, "1..2".parse().unwrap(), tch::Device::Cpu, 256).unwrap();
    let model = hosted.info.model_id.clone();
    let opts = ServeOptions {
        batch,
        caps,
        ..ServeOptions::default()
    };
    let addr = server::spawn("127.0.0.1:0".parse().unwrap(), hosted, opts).unwrap();
    (addr.to_string(), model)
}

fn batching(max_batch: usize, window_ms: u64) -> BatchOptions {
    BatchOptions {
        max_batch,
        window: Duration::from_millis(window_ms),
    }
}

#[derive(Clone)]
struct Request {
    prompt: &'static [u8],
    len: usize,
    seed: u64,
    temperature: f64,
}

fn req(prompt: &'static [u8], len: usize, seed: u64) -> Request {
    Request {
        prompt,
        len,
        seed,
        temperature: 1.0,
    }
}

/// A connection to `addr`, past its greeting.
async fn connect(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    match read_message(&mut s, 1 << 20).await.unwrap() {
        Message::Greeting(_) => s,
        other => panic!("expected a greeting, got {other:?}"),
    }
}

/// The next frame that is not a keepalive.
async fn reply(s: &mut TcpStream) -> Message {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), read_message(s, 1 << 24))
            .await
            .expect("a reply in time")
            .unwrap();
        if m != Message::Keepalive {
            return m;
        }
    }
}

async fn info(addr: &str) -> ServerInfo {
    let mut s = connect(addr).await;
    write_message(&mut s, &Message::Info).await.unwrap();
    match reply(&mut s).await {
        Message::ServerInfo(i) => i,
        other => panic!("expected ServerInfo, got {other:?}"),
    }
}

/// Sends `r` on `s` (one stage: this server's blocks 1..2) and gives the output bytes,
/// or the error's text.
async fn generate(
    s: &mut TcpStream,
    addr: &str,
    model: &str,
    r: &Request,
    steps: u32,
) -> Result<Vec<u8>, String> {
    let mut tokens: Vec<u16> = r.prompt.iter().map(|&b| b as u16).collect();
    tokens.resize(r.len, MASK_TOKEN);
    let meta = DenoiseMeta {
        request_id: r.seed,
        model_id: model.into(),
        sampling: Sampling {
            steps_per_block: steps,
            temperature: r.temperature,
            top_k: 0,
            top_p: 1.0,
            heun: false,
        },
        seed: r.seed,
        route: vec![Stage {
            blocks: "1..2".parse().unwrap(),
            replicas: vec![addr.into()],
        }],
        hop: 0,
        hops: vec![],
    };
    write_message(s, &Message::Denoise(meta, tokens))
        .await
        .unwrap();
    match reply(s).await {
        Message::Result(_, bytes) => Ok(bytes),
        Message::Error(e) => Err(e.message),
        other => panic!("expected a result, got {other:?}"),
    }
}

/// Sends every request at once, each on its own connection (all connected first).
async fn concurrently(addr: &str, model: &str, rs: &[Request]) -> Vec<Result<Vec<u8>, String>> {
    let mut conns = Vec::new();
    for _ in rs {
        conns.push(connect(addr).await);
    }
    let mut calls = tokio::task::JoinSet::new();
    for (i, (mut s, r)) in conns.into_iter().zip(rs.iter().cloned()).enumerate() {
        let (addr, model) = (addr.to_string(), model.to_string());
        calls.spawn(async move { (i, generate(&mut s, &addr, &model, &r, 3).await) });
    }
    let mut out: Vec<_> = calls.join_all().await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// (batches, requests batched) the server counted between two `ServerInfo`s.
fn counted(before: &ServerInfo, after: &ServerInfo) -> (u64, u64) {
    (
        after.batches - before.batches,
        after.batched - before.batched,
    )
}

/// Concurrent requests of one length are computed in fewer passes than requests (the
/// server counts them), and each gets the bytes a server without batching gives it.
#[test]
fn concurrent_requests_share_passes_and_get_the_bytes_they_get_alone() {
    rt().block_on(async {
        for shape in [MASKED, EDM] {
            // max_batch = k: the batch closes when the k-th arrives; the window is
            // only a safety net on a loaded machine.
            let (batched, model) = start(shape, batching(4, 2000), Caps::default());
            let (alone, model2) = start(shape, batching(1, 0), Caps::default());
            assert_eq!(model, model2, "the same weights");
            let rs = [
                req(b"", 24, 1),
                req(b"Hi", 24, 2),
                Request {
                    temperature: 0.5,
                    ..req(b"Hello", 24, 3)
                },
                req(b"", 24, 4),
            ];
            let before = info(&batched).await;
            let got = concurrently(&batched, &model, &rs).await;
            let after = info(&batched).await;
            let mut want = Vec::new();
            let mut s = connect(&alone).await;
            for r in &rs {
                want.push(generate(&mut s, &alone, &model, r, 3).await);
            }
            assert_eq!(got, want, "{shape}");
            assert!(
                got.iter().all(|g| g.as_ref().is_ok_and(|b| b.len() == 24)),
                "{got:?}"
            );
            assert_ne!(got[0], got[3], "own seeds");
            let (batches, requests) = counted(&before, &after);
            assert_eq!(requests, 4, "{shape}");
            assert!(
                batches < 4,
                "{shape}: 4 concurrent requests took {batches} passes"
            );
            let alone_info = info(&alone).await;
            assert_eq!(
                (alone_info.batches, alone_info.batched),
                (4, 4),
                "batching off"
            );
        }
    });
}

/// Requests of two lengths arriving together make two batches (one per length, no
/// padding), and each is answered as alone.
#[test]
fn requests_are_batched_only_with_their_own_length() {
    rt().block_on(async {
        let (addr, model) = start(MASKED, batching(4, 300), Caps::default());
        let (alone, _) = start(MASKED, batching(1, 0), Caps::default());
        let rs = [
            req(b"a", 12, 1),
            req(b"b", 20, 2),
            req(b"c", 12, 3),
            req(b"d", 20, 4),
        ];
        let before = info(&addr).await;
        let got = concurrently(&addr, &model, &rs).await;
        let (batches, requests) = counted(&before, &info(&addr).await);
        assert_eq!((batches, requests), (2, 4));
        let mut s = connect(&alone).await;
        for (r, g) in rs.iter().zip(&got) {
            assert_eq!(*g, generate(&mut s, &alone, &model, r, 3).await);
            assert_eq!(g.as_ref().unwrap().len(), r.len);
        }
    });
}

/// Requests waiting for a batch hold their in-flight places: with 2 places, 2 of 4
/// concurrent requests are computed (together) and 2 refused by name.
#[test]
fn waiting_requests_count_against_the_in_flight_cap() {
    rt().block_on(async {
        let caps = Caps {
            max_inflight: 2,
            ..Caps::default()
        };
        let (addr, model) = start(MASKED, batching(8, 500), caps);
        let rs: Vec<Request> = (1..=4).map(|seed| req(b"", 16, seed)).collect();
        let before = info(&addr).await;
        let got = concurrently(&addr, &model, &rs).await;
        let refused: Vec<&String> = got.iter().filter_map(|g| g.as_ref().err()).collect();
        assert_eq!(refused.len(), 2, "{got:?}");
        assert!(
            refused.iter().all(|e| e.contains("--max-inflight")),
            "{refused:?}"
        );
        assert_eq!(counted(&before, &info(&addr).await), (1, 2));
    });
}

/// Requests/s of `clients` closed-loop clients (each sends its next request when the
/// last is answered) for `secs`.
async fn throughput(
    addr: &str,
    model: &str,
    clients: usize,
    len: usize,
    steps: u32,
    secs: f64,
) -> f64 {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let mut s = connect(addr).await;
        let (addr, model) = (addr.to_string(), model.to_string());
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let r = req(b"", len, (c * 1_000_000) as u64 + n);
                generate(&mut s, &addr, &model, &r, steps).await.unwrap();
                n += 1;
            }
            n
        });
    }
    let start = Instant::now();
    let done: u64 = tasks.join_all().await.iter().sum();
    done as f64 / start.elapsed().as_secs_f64()
}

/// Requests/s of 1, 4 and 8 concurrent same-length requests on one server, batching off
/// and on (windows 0, 1 and 2 ms). Prints a table; asserts nothing.
#[test]
#[ignore = "a measurement: run with --run-ignored only"]
fn bench_batching_requests_per_second() {
    let shape = std::env::var("BATCH_BENCH_SHAPE")
        .unwrap_or_else(|_| "d=128,layers=4,heads=4,dtype=f32,window=128".into());
    let (len, steps, secs) = (64, 8, 3.0);
    let settings = [
        ("off (max 1)", batching(1, 0)),
        ("on, window 0", batching(8, 0)),
        ("on, window 1 ms", batching(8, 1)),
        ("on, window 2 ms", batching(8, 2)),
    ];
    println!("shape {shape}, {len} tokens, {steps} steps/block, 2 blocks, {secs} s per cell");
    println!(
        "{:<18} {:>10} {:>10} {:>10}   mean batch at 8",
        "batching", "1 client", "4", "8"
    );
    rt().block_on(async {
        for (name, b) in settings {
            // No per-client rate: every client is this host.
            let caps = Caps {
                rate: 0.0,
                ..Caps::default()
            };
            let (addr, model) = start(&shape, b, caps);
            let mut row = Vec::new();
            let mut mean = 0.0;
            for clients in [1, 4, 8] {
                let before = info(&addr).await;
                row.push(throughput(&addr, &model, clients, len, steps, secs).await);
                let (batches, requests) = counted(&before, &info(&addr).await);
                mean = requests as f64 / batches.max(1) as f64;
            }
            println!(
                "{name:<18} {:>10.1} {:>10.1} {:>10.1}   {mean:.2}",
                row[0], row[1], row[2]
            );
        }
    });
}
