//! Timing and close semantics of the emulated link, on loopback.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blocktrain_wanlink::{
    measure, probe, probe_blocking, spawn_echo, spawn_link, spawn_link_thread, LinkSpec,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn spec(s: &str) -> LinkSpec {
    LinkSpec::parse(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtt_is_twice_the_delay() {
    let p = measure(spec("20ms"), 256 << 10).await.unwrap();
    eprintln!("20ms: {p}");
    assert!((40.0..=60.0).contains(&p.rtt_ms), "{p}");
    assert!(p.rtt_min_ms >= 39.0, "{p}"); // never much early
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_costs_one_rtt_before_its_first_byte() {
    // 40 ms each way: RTT 80 ms. Connect + the first echo crosses the handshake and one
    // round trip (~160 ms); later echoes on the same connection one round trip (~80 ms).
    // Timers never fire early, so the lower bounds hold on a loaded machine; the upper
    // bounds are generous and use the fastest of a few trips.
    let rtt = 80.0;
    let echo = spawn_echo(any()).await.unwrap();
    let link = spawn_link(any(), echo.local_addr(), spec("40ms"))
        .await
        .unwrap();
    let mut msg = [7u8; 64];
    let t = Instant::now();
    let mut c = TcpStream::connect(link.local_addr()).await.unwrap();
    c.write_all(b"E").await.unwrap(); // the echo server's echo mode
    c.write_all(&msg).await.unwrap();
    c.read_exact(&mut msg).await.unwrap();
    let first = t.elapsed().as_secs_f64() * 1e3;
    let mut later = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        c.write_all(&msg).await.unwrap();
        c.read_exact(&mut msg).await.unwrap();
        later = later.min(t.elapsed().as_secs_f64() * 1e3);
    }
    eprintln!("first exchange {first:.1} ms, later {later:.1} ms (RTT {rtt} ms)");
    assert!(first >= 2.0 * rtt - 2.0, "set-up was free: {first:.1} ms");
    assert!(first <= 3.5 * rtt, "first exchange {first:.1} ms");
    assert!(
        (rtt - 2.0..=1.5 * rtt).contains(&later),
        "later {later:.1} ms"
    );
    assert!(first - later >= 0.75 * rtt, "{first:.1} vs {later:.1} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfer_takes_delay_plus_size_over_rate() {
    // 20 ms of delay: sleeping it per chunk instead of pipelining would take seconds.
    let s = spec("20ms,20mbit");
    let echo = spawn_echo(any()).await.unwrap();
    let link = spawn_link(any(), echo.local_addr(), s).await.unwrap();
    let p = probe(link.local_addr(), 2_000_000).await.unwrap();
    eprintln!("{s}: {p}");
    let want = s.transfer_time(2_000_000).as_secs_f64() + s.delay().as_secs_f64(); // + reply
    assert!(
        (p.bulk_secs - want).abs() <= 0.25 * want,
        "{p}, want {want:.3} s"
    );
    p.check(&s, 0.25).unwrap();
    assert!(link.bytes_up() >= 2_000_000 && link.bytes_down() >= 24 + 6 * 64);
    assert_eq!(link.connections(), 2);
    let addr = link.local_addr();
    link.shutdown().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still listening after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eof_propagates_both_ways_after_the_delay() {
    let server = TcpListener::bind(any()).await.unwrap();
    let upstream = server.local_addr().unwrap();
    let link = spawn_link(any(), upstream, spec("10ms,50mbit"))
        .await
        .unwrap();
    let srv = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        s.write_all(b"from-server").await.unwrap();
        s.shutdown().await.unwrap(); // half-close: keep reading
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let t = Instant::now();
    let mut c = TcpStream::connect(link.local_addr()).await.unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap(); // ends only if the server's FIN came through
    assert_eq!(got, b"from-server");
    assert!(t.elapsed() >= Duration::from_millis(10));
    c.write_all(b"from-client").await.unwrap(); // the other direction still works
    c.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), srv)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"from-client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_on_one_side_closes_the_other() {
    let server = TcpListener::bind(any()).await.unwrap();
    let link = spawn_link(any(), server.local_addr().unwrap(), spec("5ms"))
        .await
        .unwrap();
    let mut c = TcpStream::connect(link.local_addr()).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let (mut s, _) = server.accept().await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    s.set_zero_linger().unwrap();
    drop(s); // RST
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "client not closed: {r:?}"
    );
    assert!(t.elapsed() >= Duration::from_millis(4), "{:?}", t.elapsed());

    // And the upstream is closed when the client goes away.
    let mut c = TcpStream::connect(link.local_addr()).await.unwrap();
    c.write_all(b"x").await.unwrap();
    let (mut s, _) = server.accept().await.unwrap();
    drop(c);
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut got)).await;
    assert!(r.is_ok(), "upstream not closed");
    assert_eq!(got, b"x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_closes_the_client() {
    let gone = TcpListener::bind(any())
        .await
        .unwrap()
        .local_addr()
        .unwrap(); // closed again
    let link = spawn_link(any(), gone, spec("5ms")).await.unwrap();
    let mut c = TcpStream::connect(link.local_addr()).await.unwrap();
    let mut buf = [0u8; 1];
    // Generous: the whole suite runs in parallel on two cores.
    let r = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
}

#[test]
fn blocking_thread_link() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = rt.block_on(spawn_echo(any())).unwrap();
    let link = spawn_link_thread(any(), echo.local_addr(), spec("5ms,100mbit")).unwrap();
    let p = probe_blocking(link.local_addr(), 1 << 20).unwrap();
    eprintln!("5ms,100mbit (thread): {p}");
    p.check(&link.spec(), 0.25).unwrap();
    assert!(link.bytes_up() >= 1 << 20);
    let addr = link.local_addr();
    link.shutdown();
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_close_a_seeded_share_of_connections_mid_stream() {
    let echo = spawn_echo(any()).await.unwrap();
    let cuts = blocktrain_wanlink::Cuts {
        fraction: 0.5,
        within: Duration::from_millis(50),
        seed: 7,
    };
    let link =
        blocktrain_wanlink::spawn_link_with_cuts(any(), echo.local_addr(), spec("0ms"), Some(cuts))
            .await
            .unwrap();
    let mut cut = 0;
    for _ in 0..20 {
        let mut c = TcpStream::connect(link.local_addr()).await.unwrap();
        c.write_all(b"E").await.unwrap(); // the echo server's echo mode
                                          // Keep talking for 200 ms: a cut connection ends (EOF or error) before that.
        let mut alive = true;
        for _ in 0..20 {
            let mut b = [0u8; 1];
            let ok = c.write_all(b"x").await.is_ok()
                && matches!(
                    tokio::time::timeout(Duration::from_secs(2), c.read(&mut b)).await,
                    Ok(Ok(1))
                );
            if !ok {
                alive = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cut += usize::from(!alive);
    }
    assert!(
        (4..=16).contains(&cut),
        "about half of 20 connections cut, got {cut}"
    );
}
