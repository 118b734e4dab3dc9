//! Each cap refuses with its name; a busy replica is passed over for the next one; a
//! frame that has started must finish within its deadline; frames share a byte budget,
//! and so do the answers a server reads from the next stage.
use std::time::{Duration, Instant};

use blocktrain_protocol::frame::{ErrorCode, Greeting, Message, ResultMeta, ServerInfo};
use blocktrain_serve::budget::ByteBudget;
use blocktrain_serve::framed::{read_message, write_message, FrameDeadline};
use blocktrain_serve::hop::HopLimits;
use blocktrain_serve::server::{Caps, ServeOptions};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::support::*;

fn capped(caps: Caps) -> ServeOptions {
    ServeOptions {
        caps,
        ..ServeOptions::default()
    }
}

/// One server hosting the whole model: a one-stage route.
fn whole(addr: &str) -> Vec<blocktrain_protocol::frame::Stage> {
    vec![stage("1..2", &[addr])]
}

#[test]
fn the_compute_budget_the_rate_and_the_connection_caps_refuse_by_name() {
    let s = Srv::new(
        "1..2",
        0,
        capped(Caps {
            max_token_steps: 100,
            rate: 0.5,
            burst: 3.0,
            max_connections_per_ip: 3,
            ..Caps::default()
        }),
    );
    let rt = rt();
    rt.block_on(async {
        let limits = HopLimits::default().unpooled();
        // 6 tokens x 20 steps = 120 > 100.
        let a = call_sized(&s.model, whole(&s.addr), &limits, 4, 20).await;
        expect_err(&a.message, ErrorCode::LimitExceeded, "--max-token-steps");
        // That took one of the burst of 3; one more passes, then the rate refuses.
        expect_ok(&call(&s.model, whole(&s.addr), &limits).await);
        expect_ok(&call(&s.model, whole(&s.addr), &limits).await);
        let a = call(&s.model, whole(&s.addr), &limits).await;
        expect_err(&a.message, ErrorCode::Busy, "--rate");

        // Three connections held open: the fourth is refused instead of greeted. The
        // calls above closed theirs; the server frees their places when it sees the
        // close, so wait for that first (else a held one may be the refused one).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let held = [raw(&s.addr).await, raw(&s.addr).await, raw(&s.addr).await];
        let mut c = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
        let m = read_message(&mut c, 1 << 20).await.unwrap();
        expect_err(&m, ErrorCode::Busy, "--max-connections-per-ip");
        drop(held);
        tokio::time::sleep(Duration::from_millis(200)).await;
        raw(&s.addr).await; // places free again when connections close
    });
}

#[test]
fn a_busy_replica_is_passed_over_for_the_next() {
    let busy = Srv::new(
        "1..2",
        0,
        capped(Caps {
            max_inflight: 1,
            ..Caps::default()
        }),
    );
    let spare = Srv::new("1..2", 0, ServeOptions::default());
    let rt = rt();
    rt.block_on(async {
        // A long request keeps the only place busy (1000 positions, one revealed a step).
        let (meta, tokens) = request(&busy.model, whole(&busy.addr), 1000, 1000);
        let (mut long, _) = raw(&busy.addr).await;
        send(&mut long, &Message::Denoise(meta, tokens)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let stages = vec![stage("1..2", &[&busy.addr, &spare.addr])];
        let a = call(&busy.model, stages, &HopLimits::default()).await;
        expect_ok(&a);
        assert_eq!(a.failovers, 1, "answered by the spare");
        // Asked alone, the busy one says which limit it is at.
        let a = call(&busy.model, whole(&busy.addr), &HopLimits::default()).await;
        expect_err(&a.message, ErrorCode::Busy, "--max-inflight");
        assert!(
            matches!(reply(&mut long).await, Message::Result(..)),
            "the long request was still running after {:?}: the test did not test",
            started.elapsed()
        );
    });
}

#[test]
fn a_frame_trickled_slowly_is_cut_off_at_its_deadline() {
    let s = Srv::new(
        "1..2",
        0,
        ServeOptions {
            frame_deadline: FrameDeadline {
                header: Duration::from_secs(1),
                min_bytes_per_s: 1000,
            },
            idle_timeout: Duration::from_secs(60),
            ..ServeOptions::default()
        },
    );
    let rt = rt();
    rt.block_on(async {
        let (meta, tokens) = request(&s.model, whole(&s.addr), 4, 2);
        let frame = Message::Denoise(meta, tokens).encode();
        // Half a header, then nothing: closed after about 1 s, not at the idle timeout.
        let (mut c, _) = raw(&s.addr).await;
        c.write_all(&frame[..8]).await.unwrap();
        let t = Instant::now();
        expect_err(
            &reply(&mut c).await,
            ErrorCode::BadRequest,
            "header did not arrive within 1.0 s",
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(
            read_message(&mut c, 1 << 20).await.is_err(),
            "closed after the error"
        );
        // A whole header, then the payload one byte at a time, slower than 1000 B/s.
        let (mut c, _) = raw(&s.addr).await;
        let (mut r, mut w) = c.split();
        w.write_all(&frame[..16]).await.unwrap();
        let t = Instant::now();
        let trickle = async {
            for b in &frame[16..] {
                let _ = w.write_all(&[*b]).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            m = read_message(&mut r, 1 << 20) => {
                expect_err(&m.unwrap(), ErrorCode::BadRequest, "payload did not arrive");
            }
            _ = trickle => panic!("the whole frame was taken at 10 B/s"),
        }
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    });
}

/// A frame header declaring a `Denoise` of `body` bytes (and no metadata: its payload,
/// however it arrives, is not a valid request).
fn big_header(body: u32) -> Vec<u8> {
    use blocktrain_protocol::frame::{FRAME_VERSION, MAGIC};
    let mut h = MAGIC.to_vec();
    h.extend(FRAME_VERSION.to_le_bytes());
    h.extend([3, 0]);
    h.extend(0u32.to_le_bytes());
    h.extend(body.to_le_bytes());
    h
}

#[test]
fn frames_share_a_byte_budget_and_one_that_does_not_fit_is_refused_by_name() {
    let s = Srv::new(
        "1..2",
        0,
        capped(Caps {
            max_buffered: 3 << 20,
            ..Caps::default()
        }),
    );
    let rt = rt();
    rt.block_on(async {
        let big: usize = 2 << 20;
        // The first large frame takes 2 of the 3 MiB while its payload is on the way.
        let (mut a, _) = raw(&s.addr).await;
        a.write_all(&big_header(big as u32)).await.unwrap();
        a.write_all(&vec![0u8; 1024]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A second one does not fit: refused by name once its payload was discarded...
        let (mut b, _) = raw(&s.addr).await;
        b.write_all(&big_header(big as u32)).await.unwrap();
        b.write_all(&vec![0u8; big]).await.unwrap();
        expect_err(&reply(&mut b).await, ErrorCode::Busy, "--max-buffered-mb 3");
        // ...so its connection is still in step and serves a normal request.
        let (meta, tokens) = request(&s.model, whole(&s.addr), 4, 2);
        send(&mut b, &Message::Denoise(meta, tokens)).await;
        assert!(matches!(reply(&mut b).await, Message::Result(..)));
        // The first completes (as garbage: a bad frame) and gives its bytes back.
        a.write_all(&vec![0u8; big - 1024]).await.unwrap();
        expect_err(&reply(&mut a).await, ErrorCode::BadRequest, "bad frame");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (mut c, _) = raw(&s.addr).await;
        c.write_all(&big_header(big as u32)).await.unwrap();
        c.write_all(&vec![0u8; big]).await.unwrap();
        expect_err(&reply(&mut c).await, ErrorCode::BadRequest, "bad frame");
        expect_ok(&call(&s.model, whole(&s.addr), &HopLimits::default()).await);
    });
}

/// Greets as a server hosting `info` and answers every frame with a `Result` of `body`
/// bytes (a next hop whose answers are large).
async fn answers_with(info: ServerInfo, body: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let info = info.clone();
            tokio::spawn(async move {
                let g = Greeting {
                    info,
                    key: "00".repeat(32),
                    challenge: "11".repeat(16),
                    auth: false,
                    idle_timeout_ms: 300_000,
                    connections: 1,
                };
                let _ = write_message(&mut s, &Message::Greeting(g)).await;
                while read_message(&mut s, 1 << 24).await.is_ok() {
                    let meta = ResultMeta {
                        request_id: 7,
                        hops: vec![],
                    };
                    let answer = Message::Result(meta, vec![b'x'; body]);
                    if write_message(&mut s, &answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn answers_from_the_next_hop_take_from_the_byte_budget_and_one_that_does_not_fit_fails_over() {
    let mib = 1 << 20;
    // The top stage may hold 1 MiB of frames; one next hop answers with 1.5 MiB.
    let top = Srv::new(
        "2..2",
        0,
        capped(Caps {
            max_buffered: mib,
            ..Caps::default()
        }),
    );
    let bottom = Srv::new("1..1", 0, ServeOptions::default());
    let rt = rt();
    rt.block_on(async {
        let fat = answers_with(hosted("1..1", 0).info, 3 * mib / 2).await;
        let limits = HopLimits::default();
        // Alone in its stage: busy, naming the budget (nothing else is held).
        let a = call(&top.model, route(&[&top.addr], &[&fat]), &limits).await;
        expect_err(&a.message, ErrorCode::Busy, "byte budget");
        expect_err(&a.message, ErrorCode::Busy, "--max-buffered-mb 1");
        // With a live replica after it: failed over, as for a busy one.
        let a = call(
            &top.model,
            route(&[&top.addr], &[&fat, &bottom.addr]),
            &limits,
        )
        .await;
        expect_ok(&a);
        match &a.message {
            Message::Result(meta, _) => assert_eq!(meta.hops[0].failovers, 1, "{meta:?}"),
            other => panic!("{other:?}"),
        }

        // A caller with a budget holds each answer's bytes until it drops the answer.
        let budget = ByteBudget::new(mib);
        let own = HopLimits {
            budget: Some(budget.clone()),
            ..HopLimits::default()
        };
        let half = answers_with(hosted("1..1", 0).info, mib / 2).await;
        let held = call(&top.model, vec![stage("1..1", &[&half])], &own).await;
        assert!(held.held.is_some(), "a counted answer holds its bytes");
        assert!(budget.available() < mib / 2, "{}", budget.available());
        // Meanwhile a second one does not fit: busy, the payload discarded.
        let a = call(&top.model, vec![stage("1..1", &[&half])], &own).await;
        expect_err(&a.message, ErrorCode::Busy, "held by frames");
        drop(held);
        assert_eq!(
            budget.available(),
            mib,
            "dropping the answer gives them back"
        );
        let a = call(&top.model, vec![stage("1..1", &[&half])], &own).await;
        assert!(matches!(a.message, Message::Result(..)), "{:?}", a.message);
    });
}
