//! Reading bodies: their declared shapes, and the checked decode of a peer's update.
use safetensors::tensor::{Dtype, SafeTensors};

use super::{Array, Arrays, Codec, Shapes};
use crate::{ProtocolError, Result};

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
