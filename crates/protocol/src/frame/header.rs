//! The fixed 16-byte header: written by [`frame`], checked by [`parse_header`] before
//! anything is allocated.
use crate::{ProtocolError, Result};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"BTIF";
/// Frame layout version this build speaks; a frame of another version is refused.
pub const FRAME_VERSION: u16 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 16;
/// Largest JSON metadata part accepted.
pub const MAX_META: u32 = 256 * 1024;
/// Default largest frame (metadata + body) a node accepts.
pub const DEFAULT_MAX_FRAME: u32 = 16 * 1024 * 1024;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Client asks a server what it hosts.
    Info = 1,
    /// A server's answer to [`Kind::Info`].
    ServerInfo = 2,
    /// A diffusion request travelling down the block stack.
    Denoise = 3,
    /// "Still working": sent upstream while a request is in progress.
    Keepalive = 4,
    /// The finished sequence, travelling back to the client.
    Result = 5,
    /// A request failed; says why and which blocks.
    Error = 6,
    /// One step of the autoregressive baseline (tokens or hidden states).
    ArStep = 7,
    /// The byte an autoregressive step sampled.
    ArOutput = 8,
    /// An embedding-diffusion request between stages: tokens plus the latent z.
    Latent = 9,
    /// The server's first frame on a connection: what it hosts, its key, a challenge.
    Greeting = 10,
    /// The client's signed answer to a greeting's challenge.
    Hello = 11,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Info,
            2 => Kind::ServerInfo,
            3 => Kind::Denoise,
            4 => Kind::Keepalive,
            5 => Kind::Result,
            6 => Kind::Error,
            7 => Kind::ArStep,
            8 => Kind::ArOutput,
            9 => Kind::Latent,
            10 => Kind::Greeting,
            11 => Kind::Hello,
            _ => return None,
        })
    }
}

/// A checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the frame carries.
    pub kind: Kind,
    /// Bytes of JSON metadata that follow the header.
    pub meta_len: u32,
    /// Bytes of body after the metadata.
    pub body_len: u32,
}

impl Header {
    /// Bytes after the header.
    pub fn payload_len(&self) -> usize {
        self.meta_len as usize + self.body_len as usize
    }
}

/// Parses and checks a header; `max_frame` bounds metadata + body.
pub fn parse_header(bytes: &[u8; HEADER_LEN], max_frame: u32) -> Result<Header> {
    let bad = |m: String| Err(ProtocolError::Malformed(m));
    if bytes[0..4] != MAGIC {
        return bad("not a BlockTrain inference frame (bad magic)".into());
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != FRAME_VERSION {
        return Err(ProtocolError::Rejected(format!(
            "frame version {version}, this node speaks {FRAME_VERSION}"
        )));
    }
    let Some(kind) = Kind::from_u8(bytes[6]) else {
        return bad(format!("unknown frame kind {}", bytes[6]));
    };
    if bytes[7] != 0 {
        return bad(format!("unknown frame flags {:#x}", bytes[7]));
    }
    let meta_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    let body_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
    if meta_len > MAX_META {
        return Err(ProtocolError::Rejected(format!(
            "frame metadata of {meta_len} bytes exceeds {MAX_META}"
        )));
    }
    let total = meta_len as u64 + body_len as u64;
    if total > max_frame as u64 {
        return Err(ProtocolError::Rejected(format!(
            "frame of {total} bytes exceeds this node's limit of {max_frame}"
        )));
    }
    Ok(Header {
        kind,
        meta_len,
        body_len,
    })
}

/// A whole frame: header, metadata, body.
pub(super) fn frame(kind: Kind, meta: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FRAME_VERSION.to_le_bytes());
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(body);
    out
}
