//! Calling the next stage of a route: try its replicas in order until one answers.
//!
//! Used by clients (stage 0) and by servers forwarding downstream. A replica is given
//! up on when it refuses the connection, breaks it, sends garbage, says it failed
//! internally or does not host what the route says, or stays silent for
//! `stall_timeout` (servers send keepalives while they work, so silence means stalled,
//! not slow). Errors that another replica would repeat (a bad request, or a stage
//! further down that is unavailable) end the call at once.
use std::time::Duration;

use blocktrain_protocol::frame::{ErrorCode, HopError, Message, Stage};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::framed::{read_message, write_bytes};

/// Timing and size limits of hop calls.
#[derive(Clone, Debug)]
pub struct HopLimits {
    /// Longest wait for a TCP connection.
    pub connect_timeout: Duration,
    /// Longest silence from a replica before it is given up on.
    pub stall_timeout: Duration,
    /// Largest frame accepted.
    pub max_frame: u32,
}

impl Default for HopLimits {
    fn default() -> Self {
        HopLimits {
            connect_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(10),
            max_frame: blocktrain_protocol::frame::DEFAULT_MAX_FRAME,
        }
    }
}

/// A stage's answer and how many replicas failed before it.
pub struct Answer {
    /// The final frame: `Result`, `ArOutput` or an `Error` not worth retrying.
    pub message: Message,
    /// Replicas given up on first.
    pub failovers: u32,
}

/// Why one replica was given up on.
enum Failed {
    Retry(String),
}

/// Sends the frame `make_frame(failovers)` to each replica of `stage` in turn and
/// returns the first final answer; with none, an `Unavailable` error naming the stage.
pub async fn call_stage(
    stage: &Stage,
    request_id: u64,
    limits: &HopLimits,
    make_frame: impl Fn(u32) -> Vec<u8>,
) -> Answer {
    let mut failures = Vec::new();
    for (i, addr) in stage.replicas.iter().enumerate() {
        match call_replica(addr, &make_frame(i as u32), limits).await {
            Ok(message) => {
                return Answer {
                    message,
                    failovers: i as u32,
                }
            }
            Err(Failed::Retry(why)) => {
                tracing::warn!(%addr, blocks = %stage.blocks, "replica failed: {why}");
                failures.push(format!("{addr}: {why}"));
            }
        }
    }
    Answer {
        message: Message::Error(HopError {
            request_id,
            code: ErrorCode::Unavailable,
            message: format!(
                "no server of blocks {} answered ({})",
                stage.blocks,
                failures.join("; ")
            ),
            blocks: Some(stage.blocks),
        }),
        failovers: stage.replicas.len() as u32,
    }
}

async fn call_replica(addr: &str, frame: &[u8], limits: &HopLimits) -> Result<Message, Failed> {
    let retry = |m: String| Failed::Retry(m);
    let mut stream = match timeout(limits.connect_timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(retry(format!(
                "no connection within {:?}",
                limits.connect_timeout
            )))
        }
        Ok(Err(e)) => return Err(retry(format!("cannot connect: {e}"))),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    match timeout(limits.stall_timeout, write_bytes(&mut stream, frame)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(retry(format!("sending the request: {e}"))),
        Err(_) => return Err(retry("stopped reading the request".into())),
    }
    loop {
        let msg = match timeout(
            limits.stall_timeout,
            read_message(&mut stream, limits.max_frame),
        )
        .await
        {
            Err(_) => {
                return Err(retry(format!(
                    "stalled: nothing for {:.1} s",
                    limits.stall_timeout.as_secs_f64()
                )))
            }
            Ok(Err(e)) => return Err(retry(e.to_string())),
            Ok(Ok(m)) => m,
        };
        match msg {
            Message::Keepalive => continue,
            Message::Error(e) if matches!(e.code, ErrorCode::Internal | ErrorCode::Mismatch) => {
                return Err(retry(format!("{:?}: {}", e.code, e.message)))
            }
            m @ (Message::Result(..) | Message::ArOutput(_) | Message::Error(_)) => return Ok(m),
            other => {
                return Err(retry(format!(
                    "unexpected {} frame",
                    crate::kind_name(&other)
                )))
            }
        }
    }
}
