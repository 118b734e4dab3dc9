//! Frame bodies and whole frames: token packing, f16 values, [`Message::encode`] and
//! [`Message::decode`].
use serde::{Deserialize, Serialize};

use super::greeting::Hello;
use super::header::{frame, parse_header, Header, Kind, HEADER_LEN};
use super::message::{
    ArOutput, ArPayload, ArStepMeta, DenoiseMeta, LatentMeta, LatentState, Message, MASK_TOKEN,
};
use super::route::check_route;
use crate::{ProtocolError, Result};

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

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("frame metadata serialises")
}

impl Message {
    /// The whole frame: header, metadata, body.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Info => frame(Kind::Info, b"{}", &[]),
            Message::Greeting(g) => frame(Kind::Greeting, &json(g), &[]),
            Message::Hello(h) => frame(Kind::Hello, &json(h), &[]),
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
            Kind::Greeting => {
                no_body()?;
                Message::Greeting(parse(header.kind, meta)?)
            }
            Kind::Hello => {
                no_body()?;
                let h: Hello = parse(header.kind, meta)?;
                h.check_shape()?;
                Message::Hello(h)
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
                let o: ArOutput = parse(header.kind, meta)?;
                if let Some(lp) = &o.logprobs {
                    lp.check_shape().map_err(|e| {
                        ProtocolError::Malformed(format!("ArOutput log-probabilities: {e}"))
                    })?;
                }
                Message::ArOutput(o)
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

/// Splits a whole frame (header + payload) and decodes it: for tests and fuzzing.
pub fn decode_frame(bytes: &[u8], max_frame: u32) -> Result<Message> {
    let head: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| ProtocolError::Malformed("frame shorter than its header".into()))?;
    let header = parse_header(head, max_frame)?;
    Message::decode(&header, &bytes[HEADER_LEN..])
}
