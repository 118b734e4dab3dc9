//! The accept loop, for plain HTTP and HTTPS alike: connections are served with hyper
//! directly (TLS ones after a tokio-rustls handshake), keeping what `axum::serve` gives
//! (the caller's address as `ConnectInfo` for `/v1/probe`, graceful shutdown) and adding
//! what it lacks: a deadline for a request's headers, so a client that trickles them
//! (slowloris) cannot hold a connection and its task for ever.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{Service, ServiceExt};

/// A client that connects and then neither speaks nor finishes its handshake is
/// dropped after this long (it would otherwise hold a task forever).
const HANDSHAKE: Duration = Duration::from_secs(10);

/// A request's headers must arrive within this long of its first byte (and a kept-alive
/// connection's next request within [`HEADER_READ`] too): honest clients send them in
/// one packet.
const HEADER_READ: Duration = Duration::from_secs(5);

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` resolves, then
/// waits for the connections in flight to finish their requests.
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let mut make = app.into_make_service_with_connect_info::<SocketAddr>();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // Out of file descriptors and the like: the listener itself is fine, so
                // wait a moment instead of spinning (as axum::serve does).
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Adds ConnectInfo(peer) to every request of this connection.
        let Ok(svc) = make.call(peer).await;
        let acceptor = acceptor.clone();
        let watcher = graceful.watcher();
        // Replies are small and latency matters more than packets saved.
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let svc =
                svc.map_request(|r: Request<hyper::body::Incoming>| r.map(axum::body::Body::new));
            let svc = TowerToHyperService::new(svc);
            let Some(acceptor) = acceptor else {
                return serve_connection(TokioIo::new(tcp), svc, watcher, peer).await;
            };
            let mut first = [0u8; 1];
            match tokio::time::timeout(HANDSHAKE, tcp.peek(&mut first)).await {
                Ok(Ok(1..)) if first[0] != TLS_HANDSHAKE_RECORD => {
                    return refuse_plaintext(tcp).await;
                }
                Ok(Ok(1..)) => {}
                _ => return,
            }
            let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!("TLS handshake with {peer}: {e}"),
                Err(_) => return tracing::debug!("TLS handshake with {peer} timed out"),
            };
            serve_connection(TokioIo::new(tls), svc, watcher, peer).await
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Serves one connection's requests (HTTP/1.1, kept alive) with the header deadline.
async fn serve_connection<I, S>(
    io: I,
    svc: S,
    watcher: hyper_util::server::graceful::Watcher,
    peer: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<hyper::body::Incoming>, Response = axum::response::Response>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: std::error::Error + Send + Sync + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ)
        .serve_connection(io, svc);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!("connection from {peer}: {e}");
    }
}

/// Answers a plain-HTTP request on the TLS port with a 400 that says to use https://,
/// as JSON like every other error (a worker's client shows its message), instead of a
/// reset connection that looks like a network fault and would be retried.
async fn refuse_plaintext(mut tcp: TcpStream) {
    let body = serde_json::to_string(&blocktrain_protocol::wire::ErrorBody {
        error: "this coordinator serves HTTPS only: use https:// in its URL (with \
                --tls-fingerprint to pin a self-signed certificate)"
            .into(),
    })
    .expect("error bodies serialise");
    let reply = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // Read the request head first and drain what follows after answering: closing a
    // socket with unread bytes resets it, and the client would lose the answer.
    let mut buf = vec![0u8; 16 << 10];
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(HANDSHAKE, async {
        while let Ok(n @ 1..) = tcp.read(&mut buf).await {
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(4).any(|w| w == b"\r\n\r\n") || seen.len() > 64 << 10 {
                break;
            }
        }
    })
    .await;
    if tcp.write_all(reply.as_bytes()).await.is_err() {
        return;
    }
    let _ = tcp.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(1..) = tcp.read(&mut buf).await {}
    })
    .await;
}
