//! Pooled connections: reused across requests (counted by the servers and the pool),
//! retried once when a reused one turns out dead, and fine across server restarts.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use blocktrain_protocol::frame::{Greeting, Message, ResultMeta};
use blocktrain_serve::framed::{read_message, write_message};
use blocktrain_serve::hop::{call_stage, Expect, HopLimits};
use blocktrain_serve::server::ServeOptions;
use tokio::net::TcpListener;

use super::support::*;

const N: u64 = 10;

#[test]
fn requests_over_the_pool_reuse_connections_and_survive_restarts() {
    let mut top = Srv::new("2..2", 0, ServeOptions::default());
    let mut bottom = Srv::new("1..1", 0, ServeOptions::default());
    let rt = rt();
    rt.block_on(async {
        let limits = HopLimits::default();
        let pool = limits.pool.clone().unwrap();
        let path = |t: &Srv, b: &Srv| route(&[&t.addr], &[&b.addr]);
        for _ in 0..N {
            expect_ok(&call(&top.model, path(&top, &bottom), &limits).await);
        }
        // N requests over 2 hops: one connection per hop, measured by both servers.
        let (t, b) = (accepted(&top.addr).await, accepted(&bottom.addr).await);
        assert_eq!((t, b), (1, 1), "connections accepted by top and bottom");
        assert_eq!((pool.opened(), pool.reused()), (1, N - 1));

        // Without the pool, every request opens its own connection to the top stage.
        let unpooled = HopLimits::default().unpooled();
        for _ in 0..N {
            expect_ok(&call(&top.model, path(&top, &bottom), &unpooled).await);
        }
        assert_eq!(
            accepted(&top.addr).await - t,
            N + 1,
            "N more, and one greeting probe"
        );
        assert_eq!(
            accepted(&bottom.addr).await,
            b + 1,
            "the top's own pool to the bottom"
        );

        // Both servers restart on the same addresses: the pooled connections (client ->
        // top, top -> bottom) are dead, found so, and replaced.
        let (ta, ba) = (top.addr.clone(), bottom.addr.clone());
        bottom.stop();
        bottom = Srv::start(&ba, "1..1", 0, ServeOptions::default());
        expect_ok(&call(&top.model, path(&top, &bottom), &limits).await);
        top.stop();
        top = Srv::start(&ta, "2..2", 0, ServeOptions::default());
        expect_ok(&call(&top.model, path(&top, &bottom), &limits).await);
        assert_eq!(
            pool.opened(),
            2,
            "one new connection after the top's restart"
        );
    });
}

/// A server that closes a reused connection as the request arrives (as an idle
/// timeout racing the request would): the call retries once on a fresh connection.
#[test]
fn a_pooled_connection_dead_before_any_reply_is_retried_once() {
    let rt = rt();
    rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let info = hosted("1..2", 0).info;
        let conns = Arc::new(AtomicUsize::new(0));
        let seen = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let nth = seen.fetch_add(1, Ordering::SeqCst);
                let info = info.clone();
                tokio::spawn(async move {
                    let g = Greeting {
                        info,
                        key: "00".repeat(32),
                        challenge: "11".repeat(16),
                        auth: false,
                        idle_timeout_ms: 300_000,
                        connections: nth as u64 + 1,
                    };
                    write_message(&mut s, &Message::Greeting(g)).await.unwrap();
                    for answered in 0.. {
                        if read_message(&mut s, 1 << 20).await.is_err() {
                            return;
                        }
                        if nth == 0 && answered == 1 {
                            return; // the first connection dies on its second request
                        }
                        let done = Message::Result(
                            ResultMeta {
                                request_id: 1,
                                hops: vec![],
                            },
                            vec![b'x'],
                        );
                        write_message(&mut s, &done).await.unwrap();
                    }
                });
            }
        });
        let limits = HopLimits::default();
        let one = stage("1..2", &[&addr]);
        for _ in 0..3 {
            let a = call_stage(
                &one,
                1,
                &limits,
                &Expect::default(),
                limits.deadline(1),
                |_| {
                    Message::Info.encode() // any frame: the fake answers each with a Result
                },
            )
            .await;
            expect_ok(&a);
            assert_eq!(a.failovers, 0);
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            2,
            "one retry, on a fresh connection"
        );
        let pool = limits.pool.unwrap();
        assert_eq!((pool.opened(), pool.reused()), (2, 2));
    });
}
