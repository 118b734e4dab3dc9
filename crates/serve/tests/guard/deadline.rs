//! A hop call has an overall deadline: a next hop that sends keepalives forever (so is
//! never silent for the stall timeout) is given up on like a stalled one, on the
//! diffusion path and at every step of an AR session.
use std::time::{Duration, Instant};

use blocktrain_protocol::frame::{ErrorCode, Greeting, Message, ServerInfo};
use blocktrain_serve::client::{self, Generation, Plan, Request};
use blocktrain_serve::framed::{read_message, write_message};
use blocktrain_serve::hop::HopLimits;
use blocktrain_serve::hosted::Hosted;
use blocktrain_serve::server::ServeOptions;
use blocktrain_serve::ServeError;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use super::support::*;

/// Greets as a server hosting `info`, then answers whatever comes with keepalives every
/// 100 ms, forever.
async fn stuck(info: ServerInfo) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let info = info.clone();
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.into_split();
                let g = Greeting {
                    info,
                    key: "00".repeat(32),
                    challenge: "11".repeat(16),
                    auth: false,
                    idle_timeout_ms: 300_000,
                    connections: 1,
                };
                if write_message(&mut wr, &Message::Greeting(g)).await.is_err() {
                    return;
                }
                // Reads (and ignores) the request; the keepalives never stop.
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
                });
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if write_message(&mut wr, &Message::Keepalive).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_next_hop_that_only_sends_keepalives_is_given_up_on_at_the_deadline() {
    // The top stage gives up on its next hop after 2 s however lively it looks.
    let top = Srv::new(
        "2..2",
        0,
        ServeOptions {
            limits: HopLimits {
                stall_timeout: Duration::from_secs(1),
                call_deadline: Duration::from_secs(2),
                ..HopLimits::default()
            },
            keepalive: Duration::from_millis(100),
            ..ServeOptions::default()
        },
    );
    let bottom = Srv::new("1..1", 0, ServeOptions::default());
    let rt = rt();
    rt.block_on(async {
        let hung = stuck(hosted("1..1", 0).info).await;
        let limits = HopLimits::default();
        // Alone in its stage: the call fails at the deadline, naming it.
        let t = Instant::now();
        let a = call(&top.model, route(&[&top.addr], &[&hung]), &limits).await;
        expect_err(&a.message, ErrorCode::Unavailable, "call deadline");
        let took = t.elapsed();
        assert!(
            (Duration::from_secs(2)..Duration::from_secs(10)).contains(&took),
            "{took:?}"
        );
        // With a live replica after it: failed over, as for a stalled one.
        let a = call(
            &top.model,
            route(&[&top.addr], &[&hung, &bottom.addr]),
            &limits,
        )
        .await;
        expect_ok(&a);
        match &a.message {
            Message::Result(meta, _) => assert_eq!(meta.hops[0].failovers, 1, "{meta:?}"),
            other => panic!("{other:?}"),
        }
        // A client's own call has the deadline too (here 1 s for the one stage).
        let client = HopLimits {
            call_deadline: Duration::from_secs(1),
            ..HopLimits::default()
        };
        let entry = stuck(hosted("2..2", 0).info).await;
        let t = Instant::now();
        let a = call(&top.model, vec![stage("2..2", &[&entry])], &client).await;
        expect_err(&a.message, ErrorCode::Unavailable, "call deadline");
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    });
}

/// A relay in front of the server at `target` that passes its first `answers` AR
/// answers on, then only sends keepalives every 100 ms (a stage that stalls
/// mid-session, however alive it looks).
async fn stalls_after(target: String, answers: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(&target).await else {
                    return;
                };
                let (mut crd, mut cwr) = s.into_split();
                let (mut srd, mut swr) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut crd, &mut swr).await;
                });
                let mut relayed = 0;
                while relayed < answers {
                    let Ok(m) = read_message(&mut srd, 1 << 24).await else {
                        return;
                    };
                    relayed += usize::from(matches!(m, Message::ArOutput(_)));
                    if write_message(&mut cwr, &m).await.is_err() {
                        return;
                    }
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if write_message(&mut cwr, &Message::Keepalive).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The plan of the 2-layer AR model: layer 1 on `first`, layer 2 on `last`.
fn ar_plan(h: &Hosted, first: &[&str], last: &[&str]) -> Plan {
    Plan {
        model_id: h.info.model_id.clone(),
        family: h.info.family.clone(),
        total: h.info.total,
        stages: vec![stage("1..1", first), stage("2..2", last)],
        max_tokens: h.info.max_tokens,
        window: h.info.window,
        unreachable: Vec::new(),
        latency_ms: Default::default(),
    }
}

async fn generate(plan: &Plan, limits: &HopLimits) -> Result<Generation, ServeError> {
    let req = Request {
        prompt: b"Hi".to_vec(),
        len: 12,
        sampling: sampling(1),
        seed: 5,
    };
    client::generate_ar(plan, &req, limits).await
}

#[test]
fn an_ar_stage_that_only_sends_keepalives_is_failed_over_at_the_deadline() {
    // The first stage gives up on its next hop's answer to a step after 2 s.
    let first = Srv::hosting(
        "127.0.0.1:0",
        hosted_ar("1..1", 0),
        ServeOptions {
            limits: HopLimits {
                stall_timeout: Duration::from_secs(1),
                call_deadline: Duration::from_secs(2),
                ..HopLimits::default()
            },
            keepalive: Duration::from_millis(100),
            ..ServeOptions::default()
        },
    );
    let last = Srv::hosting("127.0.0.1:0", hosted_ar("2..2", 0), ServeOptions::default());
    let h = hosted_ar("2..2", 0);
    let rt = rt();
    rt.block_on(async {
        let limits = HopLimits::default();
        let healthy = generate(&ar_plan(&h, &[&first.addr], &[&last.addr]), &limits)
            .await
            .unwrap();
        let hung = stuck(h.info.clone()).await;
        // Alone in its stage: the generation ends at the deadline, naming it.
        let t = Instant::now();
        let e = generate(&ar_plan(&h, &[&first.addr], &[&hung]), &limits)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("AR stage 2..2: no replica left"), "{e}");
        assert!(e.contains("call deadline"), "{e}");
        let took = t.elapsed();
        assert!(
            (Duration::from_secs(2)..Duration::from_secs(10)).contains(&took),
            "{took:?}"
        );
        // With a live replica after it: the session's first step fails over.
        let g = generate(&ar_plan(&h, &[&first.addr], &[&hung, &last.addr]), &limits)
            .await
            .unwrap();
        assert_eq!(g.output, healthy.output);
        assert_eq!(g.stage_failovers, vec![0, 1]);
        // Stalled mid-session (3 bytes answered, then keepalives only): given up on at
        // the deadline like a dead replica, the context re-prefilled on the other one.
        let relay = stalls_after(last.addr.clone(), 3).await;
        let t = Instant::now();
        let g = generate(&ar_plan(&h, &[&first.addr], &[&relay, &last.addr]), &limits)
            .await
            .unwrap();
        assert_eq!(g.output, healthy.output, "a failover changes no byte");
        assert_eq!(g.stage_failovers, vec![0, 1]);
        assert!(g.replayed_positions > 0, "the context was re-prefilled");
        let took = t.elapsed();
        assert!(
            (Duration::from_secs(2)..Duration::from_secs(10)).contains(&took),
            "{took:?}"
        );
        // A client's own step is bounded too (here 1 s per stage, 2 for the route).
        let client = HopLimits {
            call_deadline: Duration::from_secs(1),
            ..HopLimits::default()
        };
        let entry = stuck(hosted_ar("1..1", 0).info).await;
        let t = Instant::now();
        let e = generate(&ar_plan(&h, &[&entry], &[&last.addr]), &client)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("AR stage 1..1: no replica left"), "{e}");
        assert!(e.contains("call deadline: no answer within 2.0 s"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    });
}
