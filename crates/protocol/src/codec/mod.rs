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
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::{ProtocolError, Result};

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

/// The names and shapes of the dense tensors a body encodes, read from its own header
/// (for the receiver's own files and for checkpoints, whose shapes the worker learns from
/// them; a peer's update is decoded against the shapes the receiver expects). int8
/// bodies list each tensor once, without its `/scale`; top-k bodies are sparse and
/// declare no dense shapes.
pub fn header_shapes(bytes: &[u8]) -> Result<Shapes> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| ProtocolError::Malformed(format!("not safetensors: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| ProtocolError::Malformed(format!("not safetensors: {e}")))?;
    let codec: Option<Codec> = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("codec"))
        .and_then(|c| serde_json::from_str(c).ok());
    if let Some(Codec::TopK { .. }) = codec {
        return Err(ProtocolError::Rejected(
            "a top-k body declares no dense shapes".into(),
        ));
    }
    let int8 = matches!(codec, Some(Codec::Int8 { .. }));
    Ok(st
        .tensors()
        .into_iter()
        .filter(|(name, _)| !(int8 && name.ends_with("/scale")))
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect())
}

/// Bytes ready for `safetensors::serialize`. (The model crate has its own twin of this
/// small adapter: `model` and `protocol` deliberately share no code.)
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| f(v)).collect()
}

/// Encodes `delta` with `codec` into safetensors bytes (the codec in the metadata).
pub fn encode(delta: &Arrays, codec: Codec) -> Vec<u8> {
    let mut raws: BTreeMap<String, Raw> = BTreeMap::new();
    for (name, a) in delta {
        match codec {
            Codec::Fp32 => {
                raws.insert(
                    name.clone(),
                    Raw {
                        dtype: Dtype::F32,
                        shape: a.shape.clone(),
                        bytes: le_bytes(&a.data, f32::to_le_bytes),
                    },
                );
            }
            Codec::Fp16 => {
                let h: Vec<half::f16> = a.data.iter().map(|&v| half::f16::from_f32(v)).collect();
                raws.insert(
                    name.clone(),
                    Raw {
                        dtype: Dtype::F16,
                        shape: a.shape.clone(),
                        bytes: le_bytes(&h, half::f16::to_le_bytes),
                    },
                );
            }
            Codec::Int8 { chunk } => {
                let (q, scales) = quantize_int8(&a.data, chunk);
                raws.insert(
                    name.clone(),
                    Raw {
                        dtype: Dtype::I8,
                        shape: a.shape.clone(),
                        bytes: q.iter().map(|&v| v as u8).collect(),
                    },
                );
                raws.insert(
                    format!("{name}/scale"),
                    Raw {
                        dtype: Dtype::F32,
                        shape: vec![scales.len()],
                        bytes: le_bytes(&scales, f32::to_le_bytes),
                    },
                );
            }
            Codec::TopK { fraction } => {
                let k = ((a.data.len() as f64 * fraction as f64 - 1e-6).ceil() as usize)
                    .clamp(1, a.data.len().max(1))
                    .min(a.data.len());
                let mut idx: Vec<u32> = (0..a.data.len() as u32).collect();
                if k < idx.len() {
                    idx.select_nth_unstable_by(k, |&i, &j| {
                        a.data[j as usize]
                            .abs()
                            .total_cmp(&a.data[i as usize].abs())
                    });
                    idx.truncate(k);
                }
                idx.sort_unstable();
                let vals: Vec<half::f16> = idx
                    .iter()
                    .map(|&i| half::f16::from_f32(a.data[i as usize]))
                    .collect();
                raws.insert(
                    format!("{name}/idx"),
                    Raw {
                        dtype: Dtype::U32,
                        shape: vec![idx.len()],
                        bytes: le_bytes(&idx, u32::to_le_bytes),
                    },
                );
                raws.insert(
                    format!("{name}/val"),
                    Raw {
                        dtype: Dtype::F16,
                        shape: vec![vals.len()],
                        bytes: le_bytes(&vals, half::f16::to_le_bytes),
                    },
                );
            }
        }
    }
    let meta = HashMap::from([(
        "codec".to_string(),
        serde_json::to_string(&codec).expect("codec serialises"),
    )]);
    safetensors::serialize(raws.iter().map(|(n, r)| (n.as_str(), r)), Some(meta))
        .expect("in-memory serialisation")
}

fn quantize_int8(data: &[f32], chunk: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(data.len());
    let mut scales = Vec::with_capacity(data.len().div_ceil(chunk));
    for c in data.chunks(chunk) {
        let max = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        scales.push(scale);
        q.extend(
            c.iter()
                .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8),
        );
    }
    (q, scales)
}

/// Decodes an update, accepting only exactly the `expected` tensors, in at most
/// `max_bytes`. Returns dense f32 arrays and the codec that was used.
pub fn decode(bytes: &[u8], expected: &Shapes, max_bytes: usize) -> Result<(Arrays, Codec)> {
    if bytes.len() > max_bytes {
        return Err(ProtocolError::Rejected(format!(
            "update of {} bytes exceeds the limit of {max_bytes}",
            bytes.len()
        )));
    }
    let malformed = |e: safetensors::SafeTensorError| {
        ProtocolError::Malformed(format!("not a safetensors update: {e}"))
    };
    let st = SafeTensors::deserialize(bytes).map_err(malformed)?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(malformed)?;
    let codec: Codec = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("codec"))
        .and_then(|c| serde_json::from_str(c).ok())
        .ok_or_else(|| ProtocolError::Malformed("update names no known codec".into()))?;
    // The parameters come from the sender: check them before any arithmetic uses them.
    match codec {
        Codec::Int8 { chunk: 0 } => {
            return Err(ProtocolError::Rejected("int8 update with chunk 0".into()))
        }
        Codec::TopK { fraction } if !(fraction > 0.0 && fraction <= 1.0) => {
            return Err(ProtocolError::Rejected(format!(
                "top-k update with fraction {fraction}"
            )))
        }
        _ => {}
    }
    let wanted: Vec<String> = expected
        .keys()
        .flat_map(|n| match codec {
            Codec::Fp32 | Codec::Fp16 => vec![n.clone()],
            Codec::Int8 { .. } => vec![n.clone(), format!("{n}/scale")],
            Codec::TopK { .. } => vec![format!("{n}/idx"), format!("{n}/val")],
        })
        .collect();
    let mut got: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    got.sort();
    let mut want_sorted = wanted.clone();
    want_sorted.sort();
    if got != want_sorted {
        return Err(ProtocolError::Rejected(format!(
            "update tensors {got:?} differ from the block's {want_sorted:?}"
        )));
    }
    let tensor = |name: &str, dtype: Dtype| -> Result<safetensors::tensor::TensorView<'_>> {
        let v = st.tensor(name).map_err(malformed)?;
        if v.dtype() != dtype {
            return Err(ProtocolError::Rejected(format!(
                "{name}: dtype {:?}, expected {dtype:?}",
                v.dtype()
            )));
        }
        Ok(v)
    };
    let mut out = Arrays::new();
    for (name, shape) in expected {
        let numel: usize = shape.iter().product();
        let check_shape = |got: &[usize], want: &[usize], what: &str| {
            if got == want {
                Ok(())
            } else {
                Err(ProtocolError::Rejected(format!(
                    "{what}: shape {got:?}, expected {want:?}"
                )))
            }
        };
        let data: Vec<f32> = match codec {
            Codec::Fp32 => {
                let v = tensor(name, Dtype::F32)?;
                check_shape(v.shape(), shape, name)?;
                v.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            }
            Codec::Fp16 => {
                let v = tensor(name, Dtype::F16)?;
                check_shape(v.shape(), shape, name)?;
                v.data()
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect()
            }
            Codec::Int8 { chunk } => {
                let v = tensor(name, Dtype::I8)?;
                check_shape(v.shape(), shape, name)?;
                let s = tensor(&format!("{name}/scale"), Dtype::F32)?;
                check_shape(
                    s.shape(),
                    &[numel.div_ceil(chunk)],
                    &format!("{name}/scale"),
                )?;
                let scales: Vec<f32> = s
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                v.data()
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| q as i8 as f32 * scales[i / chunk])
                    .collect()
            }
            Codec::TopK { .. } => {
                let idx = tensor(&format!("{name}/idx"), Dtype::U32)?;
                let val = tensor(&format!("{name}/val"), Dtype::F16)?;
                if idx.shape().len() != 1 || idx.shape() != val.shape() || idx.shape()[0] > numel {
                    return Err(ProtocolError::Rejected(format!(
                        "{name}: top-k index/value shapes {:?}/{:?}",
                        idx.shape(),
                        val.shape()
                    )));
                }
                let mut dense = vec![0f32; numel];
                for (i, v) in idx.data().chunks_exact(4).zip(val.data().chunks_exact(2)) {
                    let i = u32::from_le_bytes([i[0], i[1], i[2], i[3]]) as usize;
                    let slot = dense.get_mut(i).ok_or_else(|| {
                        ProtocolError::Rejected(format!("{name}: index {i} out of range {numel}"))
                    })?;
                    *slot = half::f16::from_le_bytes([v[0], v[1]]).to_f32();
                }
                dense
            }
        };
        if let Some(bad) = data.iter().position(|v| !v.is_finite()) {
            return Err(ProtocolError::Rejected(format!(
                "{name}: value {bad} is NaN or Inf"
            )));
        }
        out.insert(
            name.clone(),
            Array {
                shape: shape.clone(),
                data,
            },
        );
    }
    Ok((out, codec))
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
mod tests {
    use super::*;

    fn delta() -> Arrays {
        let mut m = Arrays::new();
        m.insert(
            "w".into(),
            Array {
                shape: vec![4, 100],
                data: (0..400)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
                    .collect(),
            },
        );
        m.insert(
            "b".into(),
            Array {
                shape: vec![3],
                data: vec![0.5, -0.25, 0.0],
            },
        );
        m
    }

    fn max_err(a: &Arrays, b: &Arrays) -> f32 {
        a.iter()
            .flat_map(|(n, v)| v.data.iter().zip(&b[n].data).map(|(x, y)| (x - y).abs()))
            .fold(0.0, f32::max)
    }

    #[test]
    fn codecs_round_trip_within_their_precision_and_shrink() {
        let d = delta();
        let fp32 = encode(&d, Codec::Fp32);
        for (codec, tol) in [
            (Codec::Fp32, 0.0),
            (Codec::Fp16, 3e-4),
            (Codec::Int8 { chunk: 64 }, 0.5 / 127.0 / 2.0 + 1e-6),
        ] {
            let bytes = encode(&d, codec);
            let (back, c) = decode(&bytes, &shapes_of(&d), 1 << 20).unwrap();
            assert_eq!(c, codec);
            assert!(
                max_err(&d, &back) <= tol,
                "{codec:?}: {}",
                max_err(&d, &back)
            );
            if codec != Codec::Fp32 {
                assert!(bytes.len() < fp32.len(), "{codec:?} should be smaller");
            }
        }
        let (topk, _) = decode(
            &encode(&d, Codec::TopK { fraction: 0.1 }),
            &shapes_of(&d),
            1 << 20,
        )
        .unwrap();
        let kept = topk["w"].data.iter().filter(|v| **v != 0.0).count();
        assert!((35..=40).contains(&kept), "{kept}");
    }

    #[test]
    fn error_feedback_carries_what_compression_dropped() {
        let d = delta();
        let codec = Codec::TopK { fraction: 0.1 };
        let rounds = 20;
        let mean_err = |feedback: bool| {
            let mut ef = ErrorFeedback::default();
            let mut total = vec![0f32; 400];
            for _ in 0..rounds {
                let bytes = if feedback {
                    ef.encode(&d, codec)
                } else {
                    encode(&d, codec)
                };
                let (sent, _) = decode(&bytes, &shapes_of(&d), 1 << 20).unwrap();
                total
                    .iter_mut()
                    .zip(&sent["w"].data)
                    .for_each(|(t, s)| *t += s);
            }
            total
                .iter()
                .zip(&d["w"].data)
                .map(|(t, v)| (t - rounds as f32 * v).abs())
                .sum::<f32>()
                / 400.0
        };
        // Without feedback the small 90% of entries are never sent; with it they arrive late.
        let (with, without) = (mean_err(true), mean_err(false));
        assert!(
            with < without / 3.0,
            "with feedback {with}, without {without}"
        );
    }

    #[test]
    fn hostile_updates_are_rejected_with_reasons() {
        let d = delta();
        let s = shapes_of(&d);
        let good = encode(&d, Codec::Fp16);
        assert!(decode(&good, &s, 100)
            .unwrap_err()
            .to_string()
            .contains("exceeds"));
        assert!(matches!(
            decode(&good[..good.len() - 1], &s, 1 << 20),
            Err(ProtocolError::Malformed(_))
        ));
        let mut wrong = s.clone();
        wrong.insert("w".into(), vec![400]);
        assert!(decode(&good, &wrong, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("shape"));
        let mut more = s.clone();
        more.insert("extra".into(), vec![1]);
        assert!(decode(&good, &more, 1 << 20).is_err());
        let mut nan = d.clone();
        nan.get_mut("b").unwrap().data[1] = f32::NAN;
        assert!(decode(&encode(&nan, Codec::Fp32), &s, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("NaN"));
        assert!(decode(b"garbage", &s, 1 << 20).is_err());
        assert!(Codec::parse("int8:0").is_err() && Codec::parse("topk:2").is_err());
        assert_eq!(
            Codec::parse("int8:128").unwrap(),
            Codec::Int8 { chunk: 128 }
        );
    }

    #[test]
    fn codec_parameters_from_the_sender_are_checked() {
        let d = delta();
        let s = shapes_of(&d);
        for bad in [
            r#"{"codec":"int8","chunk":0}"#,
            r#"{"codec":"topk","fraction":0.0}"#,
            r#"{"codec":"topk","fraction":2.0}"#,
        ] {
            // An fp32 body labelled with hostile parameters: rejected, never a panic.
            let raws: BTreeMap<String, Raw> = d
                .iter()
                .map(|(n, a)| {
                    let bytes = le_bytes(&a.data, f32::to_le_bytes);
                    (
                        n.clone(),
                        Raw {
                            dtype: Dtype::F32,
                            shape: a.shape.clone(),
                            bytes,
                        },
                    )
                })
                .collect();
            let meta = HashMap::from([("codec".to_string(), bad.to_string())]);
            let relabeled =
                safetensors::serialize(raws.iter().map(|(n, r)| (n.as_str(), r)), Some(meta))
                    .unwrap();
            let e = decode(&relabeled, &s, 1 << 20).unwrap_err();
            assert!(
                e.to_string().contains("chunk 0") || e.to_string().contains("fraction"),
                "{e}"
            );
        }
    }
}
