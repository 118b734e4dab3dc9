//! Reading and writing [`Message`] frames on async streams.
//!
//! The header is read and checked ([`parse_header`]) before the payload buffer is
//! allocated, so an oversized or foreign frame costs the receiver 16 bytes.
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
