//! Tiny servers, fake peers that record what reaches them, raw frames.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blocktrain_model::logical::LogicalShape;
use blocktrain_protocol::frame::{
    DenoiseMeta, ErrorCode, Greeting, Message, Sampling, ServerInfo, Stage, MASK_TOKEN,
};
use blocktrain_serve::framed::{read_message, write_message};
use blocktrain_serve::hop::{call_stage, Answer, Expect, HopLimits};
use blocktrain_serve::hosted::{Hosted, Source};
use blocktrain_serve::server::{serve, ServeOptions};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

pub const TOTAL: u32 = 2;

pub fn hosted(blocks: &str, seed: i64) -> Hosted {
    hosted_family(blocks, seed, false)
}

/// Layers `layers` of a `TOTAL`-layer AR model.
pub fn hosted_ar(layers: &str, seed: i64) -> Hosted {
    hosted_family(layers, seed, true)
}

fn hosted_family(blocks: &str, seed: i64, ar: bool) -> Hosted {
    let shape: LogicalShape = "d=16,layers=1,heads=2,dtype=f32".parse().unwrap();
    Hosted::load(
        Source::Logical {
            shape: &shape,
            ar,
            total: TOTAL,
            seed,
            block_layers: None,
        },
        blocks.parse().unwrap(),
        tch::Device::Cpu,
        1024,
    )
    .unwrap()
}

/// A server on its own runtime; dropping it (or `stop`) closes it and every connection.
pub struct Srv {
    pub addr: String,
    pub model: String,
    rt: Option<tokio::runtime::Runtime>,
}

impl Srv {
    pub fn start(listen: &str, blocks: &str, seed: i64, opts: ServeOptions) -> Srv {
        Srv::hosting(listen, hosted(blocks, seed), opts)
    }

    /// A server of `h` listening at `listen`.
    pub fn hosting(listen: &str, h: Hosted, opts: ServeOptions) -> Srv {
        let model = h.info.model_id.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // Bound here (reusing the address, so a restart gets the same port), listening
        // on the server's runtime (callers may be inside another one).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(listen.parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let listener = {
            let _in = rt.enter();
            socket.listen(1024).unwrap()
        };
        rt.spawn(serve(listener, h, opts));
        Srv {
            addr: format!("127.0.0.1:{}", addr.port()),
            model,
            rt: Some(rt),
        }
    }

    pub fn new(blocks: &str, seed: i64, opts: ServeOptions) -> Srv {
        Srv::start("127.0.0.1:0", blocks, seed, opts)
    }

    /// Stops the server: its listener and all its connections close.
    pub fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // On a thread of its own: a runtime cannot be dropped inside another's
            // block_on, and this waits until its sockets are closed.
            std::thread::spawn(move || rt.shutdown_timeout(Duration::from_secs(2)))
                .join()
                .unwrap();
        }
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn sampling(steps: u32) -> Sampling {
    Sampling {
        steps_per_block: steps,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        heun: false,
    }
}

/// A diffusion request for `model` down `route` (highest blocks first).
pub fn request(model: &str, route: Vec<Stage>, len: usize, steps: u32) -> (DenoiseMeta, Vec<u16>) {
    let tokens: Vec<u16> = b"Hi"
        .iter()
        .map(|&b| b as u16)
        .chain(std::iter::repeat_n(MASK_TOKEN, len))
        .collect();
    let meta = DenoiseMeta {
        request_id: 7,
        model_id: model.into(),
        sampling: sampling(steps),
        seed: 3,
        route,
        hop: 0,
        hops: vec![],
    };
    (meta, tokens)
}

pub fn stage(blocks: &str, replicas: &[&str]) -> Stage {
    Stage {
        blocks: blocks.parse().unwrap(),
        replicas: replicas.iter().map(|s| s.to_string()).collect(),
    }
}

/// The two-stage route top (2..2) then bottom (1..1).
pub fn route(top: &[&str], bottom: &[&str]) -> Vec<Stage> {
    vec![stage("2..2", top), stage("1..1", bottom)]
}

/// Sends the request to the route's first stage as a client with `limits`.
pub async fn call(model: &str, route: Vec<Stage>, limits: &HopLimits) -> Answer {
    call_sized(model, route, limits, 4, 2).await
}

pub async fn call_sized(
    model: &str,
    route: Vec<Stage>,
    limits: &HopLimits,
    len: usize,
    steps: u32,
) -> Answer {
    let first = route[0].clone();
    let deadline = limits.deadline(route.len());
    let (meta, tokens) = request(model, route, len, steps);
    call_stage(&first, 7, limits, &Expect::default(), deadline, |_| {
        Message::Denoise(meta.clone(), tokens.clone()).encode()
    })
    .await
}

pub fn expect_ok(a: &Answer) {
    assert!(matches!(a.message, Message::Result(..)), "{:?}", a.message);
}

/// Asserts an error of `code` whose message contains `needle`.
pub fn expect_err(m: &Message, code: ErrorCode, needle: &str) {
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

/// A raw connection: the greeting, then frames by hand.
pub async fn raw(addr: &str) -> (TcpStream, Greeting) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    match read_message(&mut s, 1 << 20).await.unwrap() {
        Message::Greeting(g) => (s, g),
        other => panic!("expected a greeting, got {other:?}"),
    }
}

/// The next frame that is not a keepalive.
pub async fn reply(s: &mut TcpStream) -> Message {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), read_message(s, 1 << 24))
            .await
            .expect("a reply in time")
            .unwrap();
        if m != Message::Keepalive {
            return m;
        }
    }
}

pub async fn send(s: &mut TcpStream, m: &Message) {
    write_message(s, m).await.unwrap();
}

/// Connections a server has accepted, from the greeting of a fresh connection (which
/// counts itself, so one is taken off).
pub async fn accepted(addr: &str) -> u64 {
    raw(addr).await.1.connections - 1
}

/// A listener that is no block server: it records whether it was connected to and how
/// many bytes reached it. With `greet`, it first greets as a server of that model.
pub struct Fake {
    pub addr: String,
    pub connected: Arc<AtomicBool>,
    pub received: Arc<AtomicUsize>,
}

impl Fake {
    pub async fn start(greet: Option<ServerInfo>) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = l.local_addr().unwrap();
        let connected = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let (c, r) = (connected.clone(), received.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                c.store(true, Ordering::SeqCst);
                let r = r.clone();
                let greet = greet.clone();
                tokio::spawn(async move {
                    if let Some(info) = greet {
                        let g = Greeting {
                            info,
                            key: "00".repeat(32),
                            challenge: "11".repeat(16),
                            auth: false,
                            idle_timeout_ms: 300_000,
                            connections: 1,
                        };
                        let _ = write_message(&mut s, &Message::Greeting(g)).await;
                    }
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        r.fetch_add(n, Ordering::SeqCst);
                    }
                });
            }
        });
        Fake {
            addr: addr.to_string(),
            connected,
            received,
        }
    }
}
