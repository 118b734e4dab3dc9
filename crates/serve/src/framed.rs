//! Reading and writing [`Message`] frames on async streams.
//!
//! The header is read and checked ([`parse_header`]) before the payload buffer is
//! allocated, so an oversized or foreign frame costs the receiver 16 bytes. A reader
//! with a [`FrameDeadline`] also bounds how long a frame may take once its first byte
//! has arrived, so a peer that trickles bytes (slowloris) cannot hold a connection.
//! [`read_message_reserving`] also lets the reader reserve a frame's declared size from a
//! budget before the payload is allocated, and discards the payload of a frame it refuses.
use std::time::Duration;

use blocktrain_protocol::frame::{parse_header, Message, HEADER_LEN};
use blocktrain_protocol::ProtocolError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// The connection broke (or closed mid-frame).
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a frame this node accepts.
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    /// A frame that had started did not complete within its deadline.
    #[error("{0}")]
    TooSlow(String),
    /// The reservation for the frame's size was refused (the reason); its payload was
    /// read and discarded, so the stream is still at a frame boundary.
    #[error("{0}")]
    Refused(String),
}

/// How long a frame may take once its first byte has arrived: the rest of the header
/// within `header`, the payload within `header` plus its size at `min_bytes_per_s`.
#[derive(Clone, Copy, Debug)]
pub struct FrameDeadline {
    /// For the 16-byte header (and the base of the payload's deadline).
    pub header: Duration,
    /// Slowest transfer rate accepted for a payload, bytes per second.
    pub min_bytes_per_s: u64,
}

impl Default for FrameDeadline {
    fn default() -> Self {
        FrameDeadline {
            header: Duration::from_secs(10),
            // 256 KiB/s: a 16 MiB frame gets 74 s, a few-KB request 10 s.
            min_bytes_per_s: 256 * 1024,
        }
    }
}

impl FrameDeadline {
    /// The payload's deadline: the header's plus its size at the slowest rate.
    pub fn payload(&self, len: usize) -> Duration {
        self.header + Duration::from_secs_f64(len as f64 / self.min_bytes_per_s.max(1) as f64)
    }
}

/// Reads one frame as [`read_message`], waiting for its first byte as long as it takes
/// (the caller bounds idleness) and then holding the frame to `deadline`.
pub async fn read_message_within<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame: u32,
    deadline: &FrameDeadline,
) -> Result<Message, ReadError> {
    let (m, ()) = read_message_reserving(r, max_frame, deadline, |_| Ok(())).await?;
    Ok(m)
}

/// [`read_message_within`], calling `reserve` with the payload's declared length once the
/// header is checked and before the payload is allocated; what it returns (a permit) comes
/// back with the message, for the caller to hold while the frame's bytes live. When it
/// refuses, the payload is read into a small buffer and dropped, within the payload's
/// deadline, and the error is [`ReadError::Refused`]: the stream stays in step.
pub async fn read_message_reserving<R: AsyncRead + Unpin, P>(
    r: &mut R,
    max_frame: u32,
    deadline: &FrameDeadline,
    reserve: impl FnOnce(usize) -> Result<P, String>,
) -> Result<(Message, P), ReadError> {
    let mut head = [0u8; HEADER_LEN];
    if r.read(&mut head[..1]).await? == 0 {
        return Err(ReadError::Closed);
    }
    let slow = |what: &str, limit: Duration| {
        ReadError::TooSlow(format!(
            "the frame's {what} did not arrive within {:.1} s",
            limit.as_secs_f64()
        ))
    };
    tokio::time::timeout(deadline.header, r.read_exact(&mut head[1..]))
        .await
        .map_err(|_| slow("header", deadline.header))??;
    let header = parse_header(&head, max_frame)?;
    let len = header.payload_len();
    let limit = deadline.payload(len);
    let held = match reserve(len) {
        Ok(p) => p,
        Err(why) => {
            let mut rest = (&mut *r).take(len as u64);
            let drained =
                tokio::time::timeout(limit, tokio::io::copy(&mut rest, &mut tokio::io::sink()))
                    .await
                    .map_err(|_| slow("payload", limit))??;
            if drained < len as u64 {
                return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            return Err(ReadError::Refused(why));
        }
    };
    let mut payload = vec![0u8; len];
    tokio::time::timeout(limit, r.read_exact(&mut payload))
        .await
        .map_err(|_| slow("payload", limit))??;
    Ok((Message::decode(&header, &payload)?, held))
}

/// Reads one frame; `max_frame` bounds its metadata + body.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame: u32,
) -> Result<Message, ReadError> {
    let mut head = [0u8; HEADER_LEN];
    // A clean close shows as EOF on the first byte; anything later is a broken frame.
    if r.read(&mut head[..1]).await? == 0 {
        return Err(ReadError::Closed);
    }
    r.read_exact(&mut head[1..]).await?;
    let header = parse_header(&head, max_frame)?;
    let mut payload = vec![0u8; header.payload_len()];
    r.read_exact(&mut payload).await?;
    Ok(Message::decode(&header, &payload)?)
}

/// Writes one frame; returns the bytes written.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    message: &Message,
) -> std::io::Result<usize> {
    let bytes = message.encode();
    write_bytes(w, &bytes).await?;
    Ok(bytes.len())
}

/// Writes an already encoded frame.
pub async fn write_bytes<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}
