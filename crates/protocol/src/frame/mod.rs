//! Inference frames: what block servers and clients send each other over TCP.
//!
//! A frame is a fixed 16-byte header, a JSON metadata part and a binary body:
//!
//! ```text
//! magic "BTIF" | version u16 LE | kind u8 | flags u8 (0) | meta_len u32 LE | body_len u32 LE
//! meta (JSON, meta_len bytes) | body (body_len bytes)
//! ```
//!
//! The header is checked before anything is allocated: magic, version, kind, flags and
//! both lengths against the receiver's limits. Decoding the rest is pure and total:
//! any byte string gives a [`Message`] or a [`ProtocolError`], never a panic.
//!
//! Token sequences travel as bytes, not activations: one byte per position plus a
//! bitmap of positions still masked ([`encode_tokens`]). The embedding family's requests
//! ([`Message::Latent`]) also carry the latent z between stages: positions x width
//! values as f16, at the noise level sigma the previous stage stopped at.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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
/// Token id of a still-masked position (the model's MASK id).
pub const MASK_TOKEN: u16 = 256;

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

/// Most stages a route may have.
pub const MAX_STAGES: usize = 64;
/// Most replicas a route may list per stage.
pub const MAX_REPLICAS: usize = 16;
/// Highest block (or layer) number a range may name.
pub const MAX_BLOCK: u32 = 1 << 20;

/// A contiguous range of 1-based blocks (or layers), inclusive: `3..4` is blocks 3 and 4.
/// Deserialising goes through [`BlockRange::new`], so a peer cannot send an empty,
/// inverted or out-of-range one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawRange")]
pub struct BlockRange {
    /// First block, 1-based.
    pub first: u32,
    /// Last block, inclusive.
    pub last: u32,
}

#[derive(Deserialize)]
struct RawRange {
    first: u32,
    last: u32,
}

impl TryFrom<RawRange> for BlockRange {
    type Error = ProtocolError;

    fn try_from(r: RawRange) -> Result<Self> {
        BlockRange::new(r.first, r.last)
    }
}

impl BlockRange {
    /// `first..=last`, checked: 1 <= first <= last <= [`MAX_BLOCK`].
    pub fn new(first: u32, last: u32) -> Result<Self> {
        if first == 0 || first > last || last > MAX_BLOCK {
            return Err(ProtocolError::Rejected(format!(
                "block range {first}..{last}: blocks are numbered from 1 to {MAX_BLOCK} and the range must not be empty"
            )));
        }
        Ok(BlockRange { first, last })
    }

    /// Blocks in the range.
    pub fn len(&self) -> u32 {
        self.last - self.first + 1
    }

    /// Never true for a checked range; here for the `len` convention.
    pub fn is_empty(&self) -> bool {
        self.last < self.first
    }

    /// Whether `block` (1-based) is in the range.
    pub fn contains(&self, block: u32) -> bool {
        (self.first..=self.last).contains(&block)
    }
}

impl fmt::Display for BlockRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.first, self.last)
    }
}

impl FromStr for BlockRange {
    type Err = ProtocolError;

    /// `3..4` (inclusive) or a single `3`.
    fn from_str(s: &str) -> Result<Self> {
        let num = |p: &str| {
            p.trim().parse::<u32>().map_err(|_| {
                ProtocolError::Malformed(format!(
                    "block range '{s}': expected FIRST..LAST (1-based, inclusive) or one block number"
                ))
            })
        };
        match s.split_once("..") {
            Some((a, b)) => BlockRange::new(num(a)?, num(b.trim_start_matches('='))?),
            None => {
                let b = num(s)?;
                BlockRange::new(b, b)
            }
        }
    }
}

/// Sampling settings a request carries to every hop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Denoising steps each block takes over its interval.
    pub steps_per_block: u32,
    /// Softmax temperature (> 0).
    pub temperature: f64,
    /// Keep the k most likely bytes (0 = all).
    pub top_k: u32,
    /// Embedding diffusion: Heun steps instead of Euler's.
    #[serde(default)]
    pub heun: bool,
}

/// One stage of a route: a block range and the servers that host it (tried in order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Blocks this stage runs.
    pub blocks: BlockRange,
    /// `host:port` of each replica.
    pub replicas: Vec<String>,
}

/// What one server did for a request, reported back to the client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HopStat {
    /// Blocks it ran.
    pub blocks: BlockRange,
    /// Its name (the address it was reached at).
    pub server: String,
    /// Milliseconds of local compute.
    pub compute_ms: f64,
    /// Replicas of the NEXT stage this server gave up on before one answered.
    pub failovers: u32,
    /// Bytes of the body it sent on down the stack (0 for the last stage): tokens and mask
    /// bitmap, plus the f16 latent or hidden states; the header and JSON are not counted.
    #[serde(default)]
    pub bytes_out: u64,
}

/// A server's description of itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Identifies the model (all servers of one route must agree).
    pub model_id: String,
    /// `block` (diffusion blocks) or `ar` (layers of the autoregressive baseline).
    pub family: String,
    /// Blocks (or AR layers) this server hosts.
    pub blocks: BlockRange,
    /// Blocks (or layers) in the whole model.
    pub total: u32,
    /// Longest token sequence (prompt + output) it accepts.
    pub max_tokens: u32,
    /// Width of the residual stream (AR hidden states).
    pub d_model: u32,
    /// Positions the model was trained on (the AR pipeline keeps its context within it).
    pub window: u32,
    /// Passes this server has computed since it started: one per diffusion request that
    /// crossed it, one per AR step. Counted by the server, so a client or test can check
    /// how many traversals a generation really made.
    #[serde(default)]
    pub served: u64,
}

/// Metadata of a [`Message::Denoise`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenoiseMeta {
    /// Chosen by the client; echoed in replies.
    pub request_id: u64,
    /// Model every hop must host.
    pub model_id: String,
    /// Sampling settings.
    pub sampling: Sampling,
    /// Seed: block b samples from its own stream of it, so the output does not depend
    /// on which replica ran which block.
    pub seed: u64,
    /// The whole route, in traversal order (highest blocks first).
    pub route: Vec<Stage>,
    /// Index in `route` of the stage receiving this frame.
    pub hop: u32,
    /// What the stages before this one did.
    pub hops: Vec<HopStat>,
}

/// The embedding family's state between stages: the latent z (positions x width,
/// row-major) at noise level `sigma`.
#[derive(Clone, Debug, PartialEq)]
pub struct LatentState {
    /// Embedding width.
    pub width: u32,
    /// Noise level of z.
    pub sigma: f64,
    /// The values, f32 here, f16 on the wire.
    pub values: Vec<f32>,
}

#[derive(Serialize, Deserialize)]
struct LatentMeta {
    #[serde(flatten)]
    denoise: DenoiseMeta,
    width: u32,
    sigma: f64,
}

/// Metadata of a [`Message::Result`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultMeta {
    /// The request's id.
    pub request_id: u64,
    /// Every stage's report, in traversal order.
    pub hops: Vec<HopStat>,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is wrong (retrying elsewhere will not help).
    BadRequest,
    /// Servers disagree about the model, or a server does not host what the route says.
    Mismatch,
    /// No replica of a stage answered in time.
    Unavailable,
    /// The server failed while computing.
    Internal,
}

/// Metadata of a [`Message::Error`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HopError {
    /// The request's id (0 if it never parsed).
    pub request_id: u64,
    /// What kind of failure.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// The blocks concerned, when known.
    pub blocks: Option<BlockRange>,
}

/// What an AR session fixes once: sent with its first step only, so later steps carry
/// little more than the hidden states (a lean pipeline, as a fair baseline should be).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArSetup {
    /// Model every hop must host.
    pub model_id: String,
    /// Sampling settings (used by the last stage).
    pub sampling: Sampling,
    /// Seed of the sampling streams.
    pub seed: u64,
    /// Stages in traversal order (first holds the embedding, last the head).
    pub route: Vec<Stage>,
    /// Index in `route` of the receiver.
    pub hop: u32,
}

/// Metadata of a [`Message::ArStep`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArStepMeta {
    /// Session (one generation); the KV caches live as long as its connections.
    pub session: u64,
    /// Index of the output byte this step samples (0 for the first).
    pub output_index: u64,
    /// Hidden states: (rows, d_model) in the body as f16; None: token ids (first stage).
    pub hidden: Option<(u32, u32)>,
    /// The session's settings: on the first step of a connection, None after.
    pub setup: Option<ArSetup>,
}

/// Metadata of a [`Message::ArOutput`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArOutput {
    /// The session.
    pub session: u64,
    /// The sampled byte.
    pub byte: u8,
    /// Every stage's report for this step.
    pub hops: Vec<HopStat>,
}

/// Body of an [`Message::ArStep`].
#[derive(Clone, Debug, PartialEq)]
pub enum ArPayload {
    /// New token ids (first stage): bytes or [`MASK_TOKEN`].
    Tokens(Vec<u16>),
    /// Hidden states of the new positions, row-major (rows, d).
    Hidden(Vec<f32>),
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// "What do you host?"
    Info,
    /// The answer.
    ServerInfo(ServerInfo),
    /// A diffusion request and the current token sequence (bytes or [`MASK_TOKEN`]).
    Denoise(DenoiseMeta, Vec<u16>),
    /// Still working.
    Keepalive,
    /// The finished sequence (every position a byte).
    Result(ResultMeta, Vec<u8>),
    /// A failure.
    Error(HopError),
    /// One autoregressive step.
    ArStep(ArStepMeta, ArPayload),
    /// One sampled byte.
    ArOutput(ArOutput),
    /// An embedding-diffusion request and its current tokens (prompt bytes, MASK at the
    /// output) with the latent a previous stage handed on.
    Latent(DenoiseMeta, Vec<u16>, LatentState),
}

/// Packs tokens as one byte each plus a bitmap of masked positions (LSB first).
pub fn encode_tokens(tokens: &[u16]) -> Vec<u8> {
    let n = tokens.len();
    let mut out = vec![0u8; n + n.div_ceil(8)];
    for (i, &t) in tokens.iter().enumerate() {
        if t >= MASK_TOKEN {
            out[n + i / 8] |= 1 << (i % 8);
        } else {
            out[i] = t as u8;
        }
    }
    out
}

/// Inverse of [`encode_tokens`]; the body must be exactly `n + ceil(n / 8)` bytes for
/// some n, masked positions must carry 0 and unused bitmap bits must be 0, so one
/// sequence has exactly one encoding.
pub fn decode_tokens(body: &[u8]) -> Result<Vec<u16>> {
    // n + ceil(n/8) is strictly increasing, so n is found by solving for it.
    let n = body.len() * 8 / 9;
    let n = (n.saturating_sub(1)..=n + 1)
        .find(|&n| n + n.div_ceil(8) == body.len())
        .ok_or_else(|| {
            ProtocolError::Malformed(format!(
                "token body of {} bytes is not n bytes + an n-bit mask",
                body.len()
            ))
        })?;
    let (bytes, bits) = body.split_at(n);
    let mut out = Vec::with_capacity(n);
    for (i, &b) in bytes.iter().enumerate() {
        let masked = bits[i / 8] >> (i % 8) & 1 == 1;
        if masked && b != 0 {
            return Err(ProtocolError::Malformed(format!(
                "masked position {i} carries byte {b}"
            )));
        }
        out.push(if masked { MASK_TOKEN } else { b as u16 });
    }
    let used = n % 8;
    if used != 0 && bits[n / 8] >> used != 0 {
        return Err(ProtocolError::Malformed(
            "stray bits after the token mask".into(),
        ));
    }
    Ok(out)
}

fn f16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect()
}

fn f16_values(body: &[u8], rows: u32, d: u32) -> Result<Vec<f32>> {
    // Dimensions come from the sender: checked arithmetic, never an overflow.
    let expect = (rows as usize).saturating_mul(d as usize);
    if expect.checked_mul(2) != Some(body.len()) {
        return Err(ProtocolError::Malformed(format!(
            "hidden states: {} bytes for {expect} f16 values",
            body.len()
        )));
    }
    let values: Vec<f32> = body
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(ProtocolError::Rejected(
            "hidden states hold non-finite values".into(),
        ));
    }
    Ok(values)
}

fn frame(kind: Kind, meta: &[u8], body: &[u8]) -> Vec<u8> {
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

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("frame metadata serialises")
}

impl Message {
    /// The whole frame: header, metadata, body.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Info => frame(Kind::Info, b"{}", &[]),
            Message::ServerInfo(i) => frame(Kind::ServerInfo, &json(i), &[]),
            Message::Denoise(m, t) => frame(Kind::Denoise, &json(m), &encode_tokens(t)),
            Message::Keepalive => frame(Kind::Keepalive, b"{}", &[]),
            Message::Result(m, bytes) => frame(Kind::Result, &json(m), bytes),
            Message::Error(e) => frame(Kind::Error, &json(e), &[]),
            Message::ArStep(m, ArPayload::Tokens(t)) => {
                frame(Kind::ArStep, &json(m), &encode_tokens(t))
            }
            Message::ArStep(m, ArPayload::Hidden(h)) => {
                frame(Kind::ArStep, &json(m), &f16_bytes(h))
            }
            Message::ArOutput(o) => frame(Kind::ArOutput, &json(o), &[]),
            Message::Latent(m, t, z) => {
                let meta = LatentMeta {
                    denoise: m.clone(),
                    width: z.width,
                    sigma: z.sigma,
                };
                let mut body = encode_tokens(t);
                body.extend(f16_bytes(&z.values));
                frame(Kind::Latent, &json(&meta), &body)
            }
        }
    }

    /// Decodes the bytes after a header that [`parse_header`] accepted.
    pub fn decode(header: &Header, payload: &[u8]) -> Result<Message> {
        if payload.len() != header.payload_len() {
            return Err(ProtocolError::Malformed(format!(
                "frame payload is {} bytes, header says {}",
                payload.len(),
                header.payload_len()
            )));
        }
        let (meta, body) = payload.split_at(header.meta_len as usize);
        let no_body = || {
            if body.is_empty() {
                Ok(())
            } else {
                Err(ProtocolError::Malformed(format!(
                    "{:?} frame must have an empty body",
                    header.kind
                )))
            }
        };
        fn parse<T: for<'de> Deserialize<'de>>(kind: Kind, meta: &[u8]) -> Result<T> {
            serde_json::from_slice(meta)
                .map_err(|e| ProtocolError::Malformed(format!("{kind:?} frame metadata: {e}")))
        }
        Ok(match header.kind {
            Kind::Info => {
                no_body()?;
                Message::Info
            }
            Kind::Keepalive => {
                no_body()?;
                Message::Keepalive
            }
            Kind::ServerInfo => {
                no_body()?;
                Message::ServerInfo(parse(header.kind, meta)?)
            }
            Kind::Error => {
                no_body()?;
                Message::Error(parse(header.kind, meta)?)
            }
            Kind::ArOutput => {
                no_body()?;
                Message::ArOutput(parse(header.kind, meta)?)
            }
            Kind::Denoise => {
                let m: DenoiseMeta = parse(header.kind, meta)?;
                check_route(&m.route, m.hop)?;
                Message::Denoise(m, decode_tokens(body)?)
            }
            Kind::Result => Message::Result(parse(header.kind, meta)?, body.to_vec()),
            Kind::ArStep => {
                let m: ArStepMeta = parse(header.kind, meta)?;
                if let Some(setup) = &m.setup {
                    check_route(&setup.route, setup.hop)?;
                }
                let payload = match m.hidden {
                    Some((rows, d)) => ArPayload::Hidden(f16_values(body, rows, d)?),
                    None => ArPayload::Tokens(decode_tokens(body)?),
                };
                Message::ArStep(m, payload)
            }
            Kind::Latent => {
                let m: LatentMeta = parse(header.kind, meta)?;
                check_route(&m.denoise.route, m.denoise.hop)?;
                if !(m.sigma.is_finite() && m.sigma > 0.0) || m.width == 0 {
                    return Err(ProtocolError::Malformed(format!(
                        "latent at sigma {} of width {}: sigma must be positive, width at least 1",
                        m.sigma, m.width
                    )));
                }
                let n = latent_positions(body.len(), m.width)?;
                let (tokens, values) = body.split_at(n + n.div_ceil(8));
                let values = f16_values(values, n as u32, m.width)?;
                let z = LatentState {
                    width: m.width,
                    sigma: m.sigma,
                    values,
                };
                Message::Latent(m.denoise, decode_tokens(tokens)?, z)
            }
        })
    }
}

/// Positions n of a latent body of `len` bytes: n + ceil(n/8) token bytes, then n x
/// width f16 values (strictly increasing in n, so at most one n fits).
fn latent_positions(len: usize, width: u32) -> Result<usize> {
    let per = 2 * width as u64;
    let size = |n: u64| n + n.div_ceil(8) + n.saturating_mul(per);
    let guess = (len as u64).saturating_mul(8) / (9 + 8 * per);
    (guess.saturating_sub(1)..=guess + 1)
        .find(|&n| size(n) == len as u64)
        .map(|n| n as usize)
        .ok_or_else(|| {
            ProtocolError::Malformed(format!(
                "latent body of {len} bytes is not n tokens + an n-bit mask + n x {width} f16 values"
            ))
        })
}

/// A route must name its receiver, give every stage one to [`MAX_REPLICAS`] servers,
/// and have at most [`MAX_STAGES`] stages (a server dials what a route names).
fn check_route(route: &[Stage], hop: u32) -> Result<()> {
    if route.len() > MAX_STAGES || route.iter().any(|s| s.replicas.len() > MAX_REPLICAS) {
        return Err(ProtocolError::Rejected(format!(
            "a route may have {MAX_STAGES} stages of {MAX_REPLICAS} replicas at most"
        )));
    }
    if hop as usize >= route.len() {
        return Err(ProtocolError::Malformed(format!(
            "hop {hop} of a {}-stage route",
            route.len()
        )));
    }
    if let Some(s) = route.iter().find(|s| s.replicas.is_empty()) {
        return Err(ProtocolError::Malformed(format!(
            "stage {} has no server",
            s.blocks
        )));
    }
    Ok(())
}

/// Splits a whole frame (header + payload) and decodes it: for tests and fuzzing.
pub fn decode_frame(bytes: &[u8], max_frame: u32) -> Result<Message> {
    let head: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| ProtocolError::Malformed("frame shorter than its header".into()))?;
    let header = parse_header(head, max_frame)?;
    Message::decode(&header, &bytes[HEADER_LEN..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling() -> Sampling {
        Sampling {
            steps_per_block: 8,
            temperature: 1.0,
            top_k: 0,
            heun: false,
        }
    }

    fn route() -> Vec<Stage> {
        vec![
            Stage {
                blocks: "3..4".parse().unwrap(),
                replicas: vec!["10.0.0.3:7100".into()],
            },
            Stage {
                blocks: "1..2".parse().unwrap(),
                replicas: vec!["10.0.0.1:7100".into(), "10.0.0.2:7100".into()],
            },
        ]
    }

    fn samples() -> Vec<Message> {
        let tokens: Vec<u16> = b"Hello"
            .iter()
            .map(|&b| b as u16)
            .chain(std::iter::repeat_n(MASK_TOKEN, 11))
            .collect();
        let stat = HopStat {
            blocks: "3..4".parse().unwrap(),
            server: "a:1".into(),
            compute_ms: 1.5,
            failovers: 1,
            bytes_out: 40,
        };
        vec![
            Message::Info,
            Message::Keepalive,
            Message::ServerInfo(ServerInfo {
                model_id: "m".into(),
                family: "block".into(),
                blocks: "1..2".parse().unwrap(),
                total: 4,
                max_tokens: 4096,
                d_model: 128,
                window: 128,
                served: 3,
            }),
            Message::Denoise(
                DenoiseMeta {
                    request_id: 7,
                    model_id: "m".into(),
                    sampling: sampling(),
                    seed: 3,
                    route: route(),
                    hop: 1,
                    hops: vec![stat.clone()],
                },
                tokens.clone(),
            ),
            Message::Result(
                ResultMeta {
                    request_id: 7,
                    hops: vec![stat.clone()],
                },
                b"Hello, world".to_vec(),
            ),
            Message::Error(HopError {
                request_id: 7,
                code: ErrorCode::Unavailable,
                message: "no replica of blocks 1..2 answered".into(),
                blocks: Some("1..2".parse().unwrap()),
            }),
            Message::ArStep(
                ArStepMeta {
                    session: 1,
                    output_index: 0,
                    hidden: None,
                    setup: Some(ArSetup {
                        model_id: "m".into(),
                        sampling: sampling(),
                        seed: 0,
                        route: route(),
                        hop: 0,
                    }),
                },
                ArPayload::Tokens(tokens),
            ),
            Message::ArStep(
                ArStepMeta {
                    session: 1,
                    output_index: 5,
                    hidden: Some((2, 3)),
                    setup: None,
                },
                ArPayload::Hidden(vec![0.5, -1.0, 2.0, 0.0, 0.25, 8.0]),
            ),
            Message::ArOutput(ArOutput {
                session: 1,
                byte: b'x',
                hops: vec![stat.clone()],
            }),
            Message::Latent(
                DenoiseMeta {
                    request_id: 9,
                    model_id: "m".into(),
                    sampling: sampling(),
                    seed: 3,
                    route: route(),
                    hop: 1,
                    hops: vec![stat],
                },
                vec![b'H' as u16, b'i' as u16, MASK_TOKEN],
                LatentState {
                    width: 2,
                    sigma: 2.5,
                    values: vec![0.5, -1.0, 2.0, 0.0, 0.25, 8.0],
                },
            ),
        ]
    }

    #[test]
    fn latent_frames_carry_two_bytes_per_value_and_refuse_bad_shapes() {
        let Message::Latent(m, t, z) = samples().pop().unwrap() else {
            unreachable!()
        };
        let frame = Message::Latent(m.clone(), t.clone(), z.clone()).encode();
        let meta_len = u32::from_le_bytes(frame[8..12].try_into().unwrap()) as usize;
        assert_eq!(frame.len() - HEADER_LEN - meta_len, 3 + 1 + 2 * 6);
        // A body whose values do not fill n x width, and non-finite values, are refused.
        let mut short = z.clone();
        short.values.pop();
        let bad = Message::Latent(m.clone(), t.clone(), short).encode();
        assert!(decode_frame(&bad, DEFAULT_MAX_FRAME).is_err());
        let mut inf = z.clone();
        inf.values[0] = f32::INFINITY;
        let bad = Message::Latent(m.clone(), t.clone(), inf).encode();
        assert!(decode_frame(&bad, DEFAULT_MAX_FRAME).is_err());
        let mut neg = z;
        neg.sigma = -1.0;
        assert!(decode_frame(&Message::Latent(m, t, neg).encode(), DEFAULT_MAX_FRAME).is_err());
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = m.encode();
            assert_eq!(decode_frame(&bytes, DEFAULT_MAX_FRAME).unwrap(), m);
        }
    }

    #[test]
    fn tokens_pack_to_a_byte_each_plus_a_bitmap() {
        for n in 0..40usize {
            let t: Vec<u16> = (0..n)
                .map(|i| {
                    if i % 3 == 0 {
                        MASK_TOKEN
                    } else {
                        i as u16 * 7 % 256
                    }
                })
                .collect();
            let body = encode_tokens(&t);
            assert_eq!(body.len(), n + n.div_ceil(8));
            assert_eq!(decode_tokens(&body).unwrap(), t);
        }
        // A masked position carrying a byte, and a stray bitmap bit, are refused.
        let mut body = encode_tokens(&[MASK_TOKEN, 5]);
        body[0] = 9;
        assert!(decode_tokens(&body).is_err());
        let mut body = encode_tokens(&[1, 2]);
        body[2] |= 0x80;
        assert!(decode_tokens(&body).is_err());
    }

    #[test]
    fn bad_headers_are_refused_before_allocation() {
        let good = Message::Info.encode();
        let head = |b: &[u8]| -> [u8; HEADER_LEN] { b[..HEADER_LEN].try_into().unwrap() };
        assert!(parse_header(&head(&good), DEFAULT_MAX_FRAME).is_ok());
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(parse_header(&head(&bad), DEFAULT_MAX_FRAME).is_err());
        let mut bad = good.clone();
        bad[4] = 9; // version
        let e = parse_header(&head(&bad), DEFAULT_MAX_FRAME).unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
        let mut bad = good.clone();
        bad[6] = 99; // kind
        assert!(parse_header(&head(&bad), DEFAULT_MAX_FRAME).is_err());
        let mut bad = good.clone();
        bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes()); // 4 GiB body
        let e = parse_header(&head(&bad), DEFAULT_MAX_FRAME).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
    }

    #[test]
    fn truncated_or_mangled_frames_error_and_never_panic() {
        for m in samples() {
            let bytes = m.encode();
            for cut in 0..bytes.len() {
                assert!(decode_frame(&bytes[..cut], DEFAULT_MAX_FRAME).is_err());
            }
            // Flip every byte in turn: decoding may succeed (a byte value changed) but
            // must not panic.
            for i in 0..bytes.len() {
                let mut b = bytes.clone();
                b[i] ^= 0x5a;
                let _ = decode_frame(&b, DEFAULT_MAX_FRAME);
            }
        }
    }

    #[test]
    fn routes_must_name_the_receiver_and_a_server_per_stage() {
        let mut m = match &samples()[3] {
            Message::Denoise(m, _) => m.clone(),
            _ => unreachable!(),
        };
        m.hop = 2;
        let bytes = Message::Denoise(m.clone(), vec![1]).encode();
        assert!(decode_frame(&bytes, DEFAULT_MAX_FRAME).is_err());
        m.hop = 0;
        let mut empty = m.clone();
        empty.route[1].replicas.clear();
        let bytes = Message::Denoise(empty, vec![1]).encode();
        assert!(decode_frame(&bytes, DEFAULT_MAX_FRAME).is_err());
        // A route that would make a server dial hundreds of addresses is refused.
        let mut many = m.clone();
        many.route[1].replicas = (0..=MAX_REPLICAS)
            .map(|i| format!("10.0.0.{i}:1"))
            .collect();
        let bytes = Message::Denoise(many, vec![1]).encode();
        assert!(decode_frame(&bytes, DEFAULT_MAX_FRAME).is_err());
        let mut long = m;
        long.route = vec![long.route[0].clone(); MAX_STAGES + 1];
        let bytes = Message::Denoise(long, vec![1]).encode();
        assert!(decode_frame(&bytes, DEFAULT_MAX_FRAME).is_err());
    }

    #[test]
    fn block_ranges_parse_one_based_inclusive() {
        let r: BlockRange = "3..4".parse().unwrap();
        assert_eq!((r.first, r.last, r.len()), (3, 4, 2));
        assert!(r.contains(3) && r.contains(4) && !r.contains(2));
        assert_eq!("2".parse::<BlockRange>().unwrap().len(), 1);
        assert_eq!(r.to_string().parse::<BlockRange>().unwrap(), r);
        for bad in ["0..2", "4..3", "a..b", "", "1..", "-1", "1..4294967295"] {
            assert!(bad.parse::<BlockRange>().is_err(), "{bad}");
        }
        // The same checks hold for ranges arriving in frame metadata.
        for bad in [
            r#"{"first":3,"last":1}"#,
            r#"{"first":0,"last":1}"#,
            r#"{"first":1,"last":4294967295}"#,
        ] {
            assert!(serde_json::from_str::<BlockRange>(bad).is_err(), "{bad}");
        }
        assert_eq!(
            serde_json::from_str::<BlockRange>(r#"{"first":3,"last":4}"#).unwrap(),
            r
        );
    }
}
