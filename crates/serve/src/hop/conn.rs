//! Opening a connection to a server: reuse a pooled one, or dial, read the server's
//! greeting, check it is what the caller expects, and authenticate.
//!
//! Nothing is written to an address before its greeting says it is a block server of
//! the expected model and blocks: a route naming some other service (`127.0.0.1:22`)
//! or a server of another model gets a refusal, and never the request's bytes.
use std::net::SocketAddr;
use std::time::Duration;

use blocktrain_protocol::frame::{BlockRange, ErrorCode, Greeting, Hello, Message, ServerInfo};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{Failed, HopLimits};
use crate::framed::{read_message, write_message, FrameDeadline};

/// Largest greeting read from an address not yet known to be a server.
const MAX_GREETING: u32 = 64 * 1024;

/// What the caller requires of the server at the other end.
#[derive(Clone, Copy, Debug, Default)]
pub struct Expect<'a> {
    /// The model it must serve (None: any).
    pub model_id: Option<&'a str>,
    /// The blocks it must host (None: any).
    pub blocks: Option<BlockRange>,
    /// Only these addresses may be dialled, as written in routes (a server's `--peers`);
    /// None: any address whose greeting matches.
    pub peers: Option<&'a [String]>,
    /// Refuse, without dialling, addresses that resolve to loopback or unspecified IPs
    /// (a server reachable from outside must not become a way into its own host);
    /// configured peers are exempt.
    pub no_loopback: bool,
}

/// A greeted (and, with credentials, authenticated) connection.
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) greeting: Greeting,
    /// Taken from the pool (so it may have died idle: worth one retry).
    pub(crate) reused: bool,
    key: String,
}

/// The pool's key: the address and who the connection is authenticated as.
fn pool_key(addr: &str, limits: &HopLimits) -> String {
    let who = limits
        .credentials
        .as_ref()
        .map_or(String::new(), |c| c.identity.public_hex());
    format!("{addr}|{who}")
}

impl Conn {
    /// Puts the connection back into the pool (between frames only), or closes it.
    pub(crate) fn release(self, limits: &HopLimits) {
        if let Some(pool) = &limits.pool {
            if let Ok(std) = self.stream.into_std() {
                pool.put(&self.key, std, self.greeting);
            }
        }
    }
}

/// A connection to `addr`: from the pool when `pooled` and one is idle, else a fresh one.
pub(crate) async fn open(
    addr: &str,
    limits: &HopLimits,
    expect: &Expect<'_>,
    pooled: bool,
) -> Result<Conn, Failed> {
    let key = pool_key(addr, limits);
    if let Some(pool) = limits.pool.as_ref().filter(|_| pooled) {
        if let Some((std, greeting)) = pool.take(&key) {
            if let Ok(stream) = TcpStream::from_std(std) {
                check_greeting(&greeting, expect)?;
                return Ok(Conn {
                    stream,
                    greeting,
                    reused: true,
                    key,
                });
            }
        }
    }
    let (stream, greeting) = dial(addr, limits, expect).await?;
    if let Some(pool) = &limits.pool {
        pool.count_opened();
    }
    Ok(Conn {
        stream,
        greeting,
        reused: false,
        key,
    })
}

/// A fresh connection, greeted, checked and authenticated (for AR sessions, whose KV
/// caches live with their connection and so are never pooled).
pub async fn connect(
    addr: &str,
    limits: &HopLimits,
    expect: &Expect<'_>,
) -> Result<(TcpStream, Greeting), String> {
    dial(addr, limits, expect).await.map_err(|f| f.why)
}

/// What `addr` hosts now, and how many passes it has computed; over a pooled
/// connection when one is idle.
pub async fn info(addr: &str, limits: &HopLimits) -> Result<ServerInfo, String> {
    let io = async {
        let key = pool_key(addr, limits);
        let pooled = limits.pool.as_ref().and_then(|p| p.take(&key));
        let Some((std, greeting)) = pooled else {
            // A fresh greeting is the answer (counts included). No Hello is signed for
            // it: an address is asked what it hosts before it is trusted with one (a
            // hostile listed server could relay a signed Hello), and the connection,
            // unauthenticated, is not pooled.
            let (_, greeting) = dial_as(addr, limits, &Expect::default(), false)
                .await
                .map_err(|f| f.why)?;
            return Ok(greeting.info);
        };
        let mut c = Conn {
            stream: TcpStream::from_std(std).map_err(|e| e.to_string())?,
            greeting,
            reused: true,
            key,
        };
        write_message(&mut c.stream, &Message::Info)
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match read_message(&mut c.stream, limits.max_frame).await {
                Ok(Message::Keepalive) => continue,
                Ok(Message::ServerInfo(i)) => {
                    c.release(limits);
                    return Ok(i);
                }
                Ok(other) => {
                    return Err(format!(
                        "answered with a {} frame",
                        crate::kind_name(&other)
                    ))
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    timeout(limits.connect_timeout + limits.stall_timeout, io)
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()))
}

async fn dial(
    addr: &str,
    limits: &HopLimits,
    expect: &Expect<'_>,
) -> Result<(TcpStream, Greeting), Failed> {
    dial_as(addr, limits, expect, true).await
}

/// [`dial`]; `hello`: authenticate with the caller's credentials (else the connection
/// is only greeted, as for reading what a server hosts).
async fn dial_as(
    addr: &str,
    limits: &HopLimits,
    expect: &Expect<'_>,
    hello: bool,
) -> Result<(TcpStream, Greeting), Failed> {
    let peer = expect.peers.is_some_and(|p| p.iter().any(|a| a == addr));
    if expect.peers.is_some() && !peer {
        return Err(Failed::new(
            ErrorCode::Refused,
            "refused: not one of this server's configured peers (--peers)",
        ));
    }
    let targets = resolve(addr, limits.connect_timeout).await?;
    if expect.no_loopback && !peer {
        // An IPv4-mapped IPv6 address (::ffff:127.0.0.1) reaches the same host.
        if let Some(t) = targets.iter().find(|t| {
            let ip = t.ip().to_canonical();
            ip.is_loopback() || ip.is_unspecified()
        }) {
            return Err(Failed::new(
                ErrorCode::Refused,
                format!("refused: {t} is this host (a server not on loopback forwards there only to --peers)"),
            ));
        }
    }
    let mut stream = match timeout(limits.connect_timeout, TcpStream::connect(&targets[..])).await {
        Err(_) => {
            return Err(Failed::retry(format!(
                "no connection within {:?}",
                limits.connect_timeout
            )))
        }
        Ok(Err(e)) => return Err(Failed::retry(format!("cannot connect: {e}"))),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    set_keepalive(&stream);
    let greeting = read_greeting(&mut stream, limits).await?;
    check_greeting(&greeting, expect)?;
    if !hello {
        return Ok((stream, greeting));
    }
    if let Some(c) = &limits.credentials {
        let hello = Hello::sign(&c.identity, &greeting, c.join_secret.as_deref());
        // Sent now and not waited on: the request follows on the same connection, and
        // a refused Hello is answered with an error in its place.
        match timeout(
            limits.stall_timeout,
            write_message(&mut stream, &Message::Hello(hello)),
        )
        .await
        {
            Ok(Ok(_)) => {}
            _ => return Err(Failed::retry("sending the Hello failed".into())),
        }
    } else if greeting.auth {
        return Err(Failed::new(
            ErrorCode::Unauthorized,
            "it serves authenticated clients only, and this caller has no key",
        ));
    }
    Ok((stream, greeting))
}

/// Host names resolve here, so the checks above see the IPs that will be dialled.
async fn resolve(addr: &str, limit: Duration) -> Result<Vec<SocketAddr>, Failed> {
    match timeout(limit, tokio::net::lookup_host(addr)).await {
        Err(_) => Err(Failed::retry(format!("no address for {addr} in time"))),
        Ok(Err(e)) => Err(Failed::new(
            ErrorCode::Refused,
            format!("refused: not a host:port ({e})"),
        )),
        Ok(Ok(a)) => {
            let a: Vec<SocketAddr> = a.take(8).collect();
            if a.is_empty() {
                return Err(Failed::retry(format!("{addr} resolves to nothing")));
            }
            Ok(a)
        }
    }
}

/// TCP keepalives, so an idle connection through a NAT stays open and a dead peer is
/// noticed.
fn set_keepalive(s: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(5));
    let _ = socket2::SockRef::from(s).set_tcp_keepalive(&ka);
}

async fn read_greeting(stream: &mut TcpStream, limits: &HopLimits) -> Result<Greeting, Failed> {
    let deadline = FrameDeadline {
        header: limits.stall_timeout,
        ..FrameDeadline::default()
    };
    let read = crate::framed::read_message_within(stream, MAX_GREETING, &deadline);
    match timeout(limits.stall_timeout, read).await {
        Err(_) => Err(Failed::retry(format!(
            "stalled: no greeting for {:.1} s (a stalled server, or not a block server)",
            limits.stall_timeout.as_secs_f64()
        ))),
        Ok(Ok(Message::Greeting(g))) => Ok(g),
        // A server at its connection limit says so instead of greeting.
        Ok(Ok(Message::Error(e))) => {
            Err(Failed::new(e.code, format!("{:?}: {}", e.code, e.message)))
        }
        Ok(Ok(other)) => Err(Failed::new(
            ErrorCode::Refused,
            format!(
                "refused: not a block server (it opened with a {} frame)",
                crate::kind_name(&other)
            ),
        )),
        Ok(Err(e)) => Err(Failed::new(
            ErrorCode::Refused,
            format!("refused: not a block server ({e})"),
        )),
    }
}

fn check_greeting(g: &Greeting, expect: &Expect<'_>) -> Result<(), Failed> {
    if let Some(m) = expect.model_id.filter(|m| *m != g.info.model_id) {
        return Err(Failed::new(
            ErrorCode::Refused,
            format!("refused: it serves model {}, not {m}", g.info.model_id),
        ));
    }
    if let Some(b) = expect.blocks.filter(|b| *b != g.info.blocks) {
        return Err(Failed::new(
            ErrorCode::Refused,
            format!("refused: it hosts blocks {}, not {b}", g.info.blocks),
        ));
    }
    Ok(())
}
