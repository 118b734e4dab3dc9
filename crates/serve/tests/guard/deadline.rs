//! A hop call has an overall deadline: a next hop that sends keepalives forever (so is
//! never silent for the stall timeout) is given up on like a stalled one.
use std::time::{Duration, Instant};

use blocktrain_protocol::frame::{ErrorCode, Greeting, Message, ServerInfo};
use blocktrain_serve::framed::write_message;
use blocktrain_serve::hop::HopLimits;
use blocktrain_serve::server::ServeOptions;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

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
