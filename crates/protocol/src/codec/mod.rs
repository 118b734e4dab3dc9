//! Block updates on the wire: a delta (new - old weights) per tensor, as safetensors.
//!
//! | codec | per value | notes |
//! |---|---|---|
//! | `fp32` | 4 B | exact |
//! | `fp16` | 2 B | default; relative error ~1e-3 |
//! | `int8` | 1 B + 4 B per chunk | symmetric per-chunk scale; pair with [`ErrorFeedback`] |
//! | `topk` | 6 B per kept value | u32 index + fp16 value; pair with [`ErrorFeedback`] |
//!
//! [`decode`] takes the names and shapes the receiver expects and checks every tensor,
//! index, scale and the total size before building anything, so a hostile upload costs
//! at most `max_bytes` and cannot panic the receiver.
//!
//! Files: `encode` ([`encode`]), `decode` ([`decode`], [`header_shapes`]).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ProtocolError, Result};

mod decode;
mod encode;

pub use decode::{decode, header_shapes};
pub use encode::encode;

/// A dense f32 tensor in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

/// Named arrays (sorted by name).
pub type Arrays = BTreeMap<String, Array>;
/// Expected names and shapes.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// How an update is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "codec", rename_all = "lowercase")]
pub enum Codec {
    /// Exact.
    Fp32,
    /// Half precision.
    Fp16,
    /// int8 with one f32 scale per `chunk` values.
    Int8 {
        /// Values per scale.
        chunk: usize,
    },
    /// Only the largest `fraction` of entries per tensor (by magnitude).
    TopK {
        /// Share of entries kept, in (0, 1].
        fraction: f32,
    },
}

impl Codec {
    /// Parses `fp32`, `fp16`, `int8` (chunk 256), `int8:CHUNK`, `topk:FRACTION`.
    pub fn parse(s: &str) -> Result<Codec> {
        let bad = || {
            ProtocolError::Malformed(format!(
                "unknown codec '{s}' (fp32, fp16, int8[:chunk], topk:fraction)"
            ))
        };
        Ok(match s.split_once(':') {
            None if s == "fp32" => Codec::Fp32,
            None if s == "fp16" => Codec::Fp16,
            None if s == "int8" => Codec::Int8 { chunk: 256 },
            Some(("int8", c)) => Codec::Int8 {
                chunk: c.parse().ok().filter(|&c| c > 0).ok_or_else(bad)?,
            },
            Some(("topk", f)) => Codec::TopK {
                fraction: f
                    .parse()
                    .ok()
                    .filter(|&f: &f32| f > 0.0 && f <= 1.0)
                    .ok_or_else(bad)?,
            },
            _ => return Err(bad()),
        })
    }
}

/// The names and shapes of `arrays` (what a receiver expects of an update to them).
pub fn shapes_of(arrays: &Arrays) -> Shapes {
    arrays
        .iter()
        .map(|(n, a)| (n.clone(), a.shape.clone()))
        .collect()
}

/// Error feedback for lossy codecs: what compression dropped this round is added to the
/// next round's delta, so nothing is lost for good (the int8/top-k DiLoCo practice).
#[derive(Debug, Default)]
pub struct ErrorFeedback {
    residual: Arrays,
}

impl ErrorFeedback {
    /// Encodes `delta + residual` and keeps what the encoding lost as the new residual.
    pub fn encode(&mut self, delta: &Arrays, codec: Codec) -> Vec<u8> {
        let mut corrected = delta.clone();
        for (name, a) in corrected.iter_mut() {
            if let Some(r) = self
                .residual
                .get(name)
                .filter(|r| r.data.len() == a.data.len())
            {
                a.data.iter_mut().zip(&r.data).for_each(|(v, e)| *v += e);
            }
        }
        let bytes = encode(&corrected, codec);
        let (sent, _) =
            decode(&bytes, &shapes_of(&corrected), usize::MAX).expect("own encoding decodes");
        for (name, a) in corrected.iter_mut() {
            a.data
                .iter_mut()
                .zip(&sent[name].data)
                .for_each(|(v, s)| *v -= s);
        }
        self.residual = corrected;
        bytes
    }
}

#[cfg(test)]
mod tests;
