//! Calling the next stage of a route: try its replicas in order until one answers.
//!
//! Used by clients (stage 0) and by servers forwarding downstream. A replica is given
//! up on when it refuses the connection, breaks it, sends garbage, says it failed
//! internally, is busy or does not host what the route says, or stays silent for
//! `stall_timeout` (servers send keepalives while they work, so silence means stalled,
//! not slow), or has not given its final answer by the call's deadline (keepalives do
//! not extend it: a replica that sends only keepalives is as stalled as a silent one).
//! Errors that another replica would repeat (a bad request, or a stage further down
//! that is unavailable) end the call at once.
//!
//! Before anything is sent, the replica's greeting must show the model and blocks the
//! call expects ([`Expect`]): a server forwards only to servers of its own model, never
//! to whatever address a request names. Connections come from, and go back to, the
//! [`Pool`] of the [`HopLimits`] (unless it has none); a reused connection that turns
//! out dead before any reply byte is retried once on a fresh connection.
//!
//! A server's calls take each answer's declared size from its byte budget
//! ([`HopLimits::budget`]) before the payload is read, and hand the bytes held back
//! with the [`Answer`], to keep until it is relayed upstream; an answer that does not
//! fit fails that replica as `Busy` (its payload discarded unread into memory).
use std::sync::Arc;
use std::time::Duration;

use blocktrain_protocol::frame::{ErrorCode, HopError, Message, Stage};
use blocktrain_protocol::identity::Identity;
use tokio::time::timeout;

use crate::budget::{ByteBudget, Held};
use crate::framed::{read_message_reserving, write_bytes, FrameDeadline, ReadError};

mod conn;
mod pool;

pub use conn::{connect, info, Expect};
pub(crate) use conn::{open, Conn};
pub use pool::{Pool, PoolSettings};

/// Who a caller is to servers that admit only authenticated clients.
#[derive(Clone)]
pub struct Credentials {
    /// The caller's key: it signs each connection's challenge.
    pub identity: Identity,
    /// The route's join secret, when its servers require one.
    pub join_secret: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = if self.join_secret.is_some() {
            ", join secret"
        } else {
            ""
        };
        write!(f, "Credentials({}{secret})", self.identity.public_hex())
    }
}

/// Timing and size limits of hop calls, the connection pool and the caller's key.
/// Clones share the pool.
#[derive(Clone, Debug)]
pub struct HopLimits {
    /// Longest wait for a TCP connection.
    pub connect_timeout: Duration,
    /// Longest silence from a replica before it is given up on.
    pub stall_timeout: Duration,
    /// Longest a replica may take to give its final answer, keepalives or not, per
    /// stage from it to the end of the route: a call through n stages has n times this
    /// ([`HopLimits::deadline`]), so a server forwarding on gives up on a stalled next
    /// hop before its own caller gives up on it.
    pub call_deadline: Duration,
    /// Largest frame accepted.
    pub max_frame: u32,
    /// Connections kept for the next call to the same server; None: a fresh connection
    /// per call (for comparison in benches).
    pub pool: Option<Arc<Pool>>,
    /// The caller's key, for servers that require a `Hello`; None: anonymous.
    pub credentials: Option<Arc<Credentials>>,
    /// The byte budget answers are read into (a block server sets its own,
    /// `--max-buffered-mb`); None: answers up to `max_frame` are read unbudgeted.
    pub budget: Option<ByteBudget>,
}

impl Default for HopLimits {
    fn default() -> Self {
        HopLimits {
            connect_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(10),
            call_deadline: Duration::from_secs(300),
            max_frame: blocktrain_protocol::frame::DEFAULT_MAX_FRAME,
            pool: Some(Arc::new(Pool::default())),
            credentials: None,
            budget: None,
        }
    }
}

impl HopLimits {
    /// The same limits without a pool: every call opens (and closes) its connections.
    pub fn unpooled(self) -> Self {
        HopLimits { pool: None, ..self }
    }

    /// The deadline of a call through `stages` stages (the one called and those after
    /// it on the route): [`HopLimits::call_deadline`] for each.
    pub fn deadline(&self, stages: usize) -> Duration {
        self.call_deadline
            .saturating_mul(u32::try_from(stages.max(1)).unwrap_or(u32::MAX))
    }

    /// Reads the next frame of an answer from a replica: its declared size is taken from
    /// [`HopLimits::budget`] (if any) before its payload is read, and held while the frame
    /// lives. The caller bounds the wait with the stall timeout, which also bounds the
    /// frame's transfer.
    pub(crate) async fn read_answer<R: tokio::io::AsyncRead + Unpin>(
        &self,
        r: &mut R,
    ) -> Result<(Message, Option<Held>), ReadError> {
        let whole_read = FrameDeadline {
            header: self.stall_timeout,
            min_bytes_per_s: u64::MAX,
        };
        read_message_reserving(r, self.max_frame, &whole_read, |len| {
            self.budget.as_ref().map_or(Ok(None), |b| b.reserve(len))
        })
        .await
    }
}

/// Why a replica was given up on at its call's deadline.
pub(crate) fn past_deadline(deadline: Duration) -> String {
    format!(
        "call deadline: no answer within {:.1} s (keepalives do not extend it)",
        deadline.as_secs_f64()
    )
}

/// Why a replica whose answer did not fit the caller's byte budget was given up on.
pub(crate) fn over_budget(why: &str) -> String {
    format!("its answer does not fit this server's byte budget: {why}")
}

/// A stage's answer and how many replicas failed before it.
pub struct Answer {
    /// The final frame: `Result`, `ArOutput` or an `Error` not worth retrying.
    pub message: Message,
    /// Replicas given up on first.
    pub failovers: u32,
    /// The bytes of [`HopLimits::budget`] the answer holds: keep them until the answer
    /// has been relayed (None: not counted).
    pub held: Option<Held>,
}

/// Why one replica was given up on: the error code it counts as, and why.
pub(crate) struct Failed {
    pub(crate) code: ErrorCode,
    pub(crate) why: String,
}

impl Failed {
    pub(crate) fn new(code: ErrorCode, why: impl Into<String>) -> Failed {
        Failed {
            code,
            why: why.into(),
        }
    }

    /// Unreachable, broken or stalled: another replica may do.
    pub(crate) fn retry(why: String) -> Failed {
        Failed::new(ErrorCode::Unavailable, why)
    }
}

/// Sends the frame `make_frame(failovers)` to each replica of `stage` that greets as
/// `expect` requires, in turn, and returns the first final answer; with none, an error
/// naming the stage: `Refused` or `Busy` when every replica was refused or busy,
/// `Unavailable` otherwise. Each replica has `deadline` (from the request's write) for
/// its final answer ([`HopLimits::deadline`] of the stages left on the route).
pub async fn call_stage(
    stage: &Stage,
    request_id: u64,
    limits: &HopLimits,
    expect: &Expect<'_>,
    deadline: Duration,
    make_frame: impl Fn(u32) -> Vec<u8>,
) -> Answer {
    let expect = Expect {
        blocks: Some(stage.blocks),
        ..*expect
    };
    let mut failures = Vec::new();
    let mut codes = Vec::new();
    for (i, addr) in stage.replicas.iter().enumerate() {
        match call_replica(addr, &make_frame(i as u32), limits, &expect, deadline).await {
            Ok((message, held)) => {
                return Answer {
                    message,
                    failovers: i as u32,
                    held,
                }
            }
            Err(f) => {
                tracing::warn!(%addr, blocks = %stage.blocks, "replica failed: {}", f.why);
                failures.push(format!("{addr}: {}", f.why));
                codes.push(f.code);
            }
        }
    }
    let code = match codes.first() {
        Some(&c)
            if codes.iter().all(|&x| x == c)
                && matches!(
                    c,
                    ErrorCode::Refused | ErrorCode::Busy | ErrorCode::Unauthorized
                ) =>
        {
            c
        }
        _ => ErrorCode::Unavailable,
    };
    Answer {
        message: Message::Error(HopError {
            request_id,
            code,
            message: format!(
                "no server of blocks {} answered ({})",
                stage.blocks,
                failures.join("; ")
            ),
            blocks: Some(stage.blocks),
        }),
        failovers: stage.replicas.len() as u32,
        held: None,
    }
}

async fn call_replica(
    addr: &str,
    frame: &[u8],
    limits: &HopLimits,
    expect: &Expect<'_>,
    deadline: Duration,
) -> Result<(Message, Option<Held>), Failed> {
    // Dropping an exchange at its deadline closes its connection (never pooled).
    let within = |conn| async move {
        timeout(deadline, exchange(conn, frame, limits))
            .await
            .unwrap_or_else(|_| Err(Exchange::Failed(Failed::retry(past_deadline(deadline)))))
    };
    let conn = open(addr, limits, expect, true).await?;
    let reused = conn.reused;
    match within(conn).await {
        // An idle connection the server closed (its idle timeout, a restart) shows as
        // a dead one before any reply: the request never ran, so it is sent again.
        Err(Exchange::NoReply(why)) if reused => {
            tracing::debug!(%addr, "pooled connection dead ({why}): reconnecting");
            let conn = open(addr, limits, expect, false).await?;
            within(conn).await.map_err(Exchange::failed)
        }
        other => other.map_err(Exchange::failed),
    }
}

/// How an exchange on one connection failed.
enum Exchange {
    /// Before any reply byte: the connection was dead when the request went out.
    NoReply(String),
    /// After the replica had started answering.
    Failed(Failed),
}

impl Exchange {
    fn failed(self) -> Failed {
        match self {
            Exchange::NoReply(why) => Failed::retry(why),
            Exchange::Failed(f) => f,
        }
    }
}

/// One request and its answer on `conn`; the connection goes back to the pool after a
/// complete successful answer (an error reply may be followed by a close).
async fn exchange(
    mut conn: Conn,
    frame: &[u8],
    limits: &HopLimits,
) -> Result<(Message, Option<Held>), Exchange> {
    let retry = |m: String| Exchange::Failed(Failed::retry(m));
    match timeout(limits.stall_timeout, write_bytes(&mut conn.stream, frame)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Exchange::NoReply(format!("sending the request: {e}"))),
        Err(_) => return Err(retry("stopped reading the request".into())),
    }
    let mut replied = false;
    loop {
        let (msg, held) =
            match timeout(limits.stall_timeout, limits.read_answer(&mut conn.stream)).await {
                Err(_) => {
                    return Err(retry(format!(
                        "stalled: nothing for {:.1} s",
                        limits.stall_timeout.as_secs_f64()
                    )))
                }
                Ok(Err(e @ (ReadError::Closed | ReadError::Io(_)))) if !replied => {
                    return Err(Exchange::NoReply(e.to_string()))
                }
                // Its payload was discarded: another replica may answer when bytes are free.
                Ok(Err(ReadError::Refused(why))) => {
                    return Err(Exchange::Failed(Failed::new(
                        ErrorCode::Busy,
                        over_budget(&why),
                    )))
                }
                Ok(Err(e)) => return Err(retry(e.to_string())),
                Ok(Ok(m)) => m,
            };
        replied = true;
        match msg {
            Message::Keepalive => continue,
            Message::Error(e)
                if matches!(
                    e.code,
                    ErrorCode::Internal | ErrorCode::Mismatch | ErrorCode::Busy
                ) =>
            {
                return Err(Exchange::Failed(Failed::new(
                    e.code,
                    format!("{:?}: {}", e.code, e.message),
                )))
            }
            m @ (Message::Result(..) | Message::ArOutput(_)) => {
                conn.release(limits);
                return Ok((m, held));
            }
            m @ Message::Error(_) => return Ok((m, held)),
            other => {
                return Err(retry(format!(
                    "unexpected {} frame",
                    crate::kind_name(&other)
                )))
            }
        }
    }
}
