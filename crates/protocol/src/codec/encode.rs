//! Encoding a delta with a [`Codec`] into safetensors bytes.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, View};

use super::{Arrays, Codec};

/// Bytes ready for `safetensors::serialize`. (The model crate has its own twin of this
/// small adapter: `model` and `protocol` deliberately share no code.)
pub(super) struct Raw {
    pub(super) dtype: Dtype,
    pub(super) shape: Vec<usize>,
    pub(super) bytes: Vec<u8>,
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

pub(super) fn le_bytes<T: Copy, const N: usize>(values: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
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
