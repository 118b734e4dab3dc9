//! Strict safetensors (de)serialisation of named tensors.
//!
//! Checkpoints and (later) network updates are untrusted bytes. Parsing goes through
//! the `safetensors` crate's validated header reader; loading into a network checks
//! the exact name set, every shape and dtype, and finiteness before anything is
//! copied, so a bad file leaves the live weights untouched. Files are written to a
//! temporary name and renamed, so a crash never leaves half a checkpoint.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use crate::{ModelError, Result};

/// Named tensors in a fixed (sorted) order.
pub type NamedTensors = BTreeMap<String, Tensor>;

struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &HostTensor {
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

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        other => {
            return Err(ModelError::Mismatch(format!(
                "dtype {other:?} cannot be stored"
            )))
        }
    })
}

fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        other => return Err(ModelError::Corrupt(format!("unsupported dtype {other:?}"))),
    })
}

/// Serialises `tensors` (any device) with string `metadata` into safetensors bytes.
pub fn to_bytes(tensors: &NamedTensors, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut host = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(Device::Cpu).contiguous();
        let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, t.numel())?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        host.push((
            name.clone(),
            HostTensor {
                dtype: dtype_of(t.kind())?,
                shape,
                bytes,
            },
        ));
    }
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    let views = host.iter().map(|(n, h)| (n.as_str(), h));
    // No metadata map when empty: safetensors 0.8 writes an unreadable header for an
    // empty one.
    let meta = (!meta.is_empty()).then_some(meta);
    safetensors::serialize(views, meta).map_err(|e| ModelError::Corrupt(e.to_string()))
}

/// Parses safetensors bytes into CPU tensors plus metadata. Never panics on bad input.
pub fn from_bytes(bytes: &[u8]) -> Result<(NamedTensors, BTreeMap<String, String>)> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Corrupt(e.to_string()))?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Corrupt(e.to_string()))?;
    let metadata = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut out = NamedTensors::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype())?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        out.insert(name, t);
    }
    Ok((out, metadata))
}

/// Copies `incoming` into `target` after checking names, shapes, dtypes and finiteness.
/// On any mismatch nothing is copied.
pub fn load_strict(target: &NamedTensors, incoming: &NamedTensors) -> Result<()> {
    check_compatible(target, incoming)?;
    tch::no_grad(|| -> Result<()> {
        for (name, dst) in target {
            let mut dst = dst.shallow_clone();
            dst.f_copy_(&incoming[name])?;
        }
        Ok(())
    })
}

/// The checks of [`load_strict`] without copying.
pub fn check_compatible(target: &NamedTensors, incoming: &NamedTensors) -> Result<()> {
    let missing: Vec<&String> = target
        .keys()
        .filter(|k| !incoming.contains_key(*k))
        .collect();
    let extra: Vec<&String> = incoming
        .keys()
        .filter(|k| !target.contains_key(*k))
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(ModelError::Mismatch(format!(
            "tensor names differ: missing {missing:?}, unexpected {extra:?}"
        )));
    }
    for (name, dst) in target {
        let src = &incoming[name];
        if src.size() != dst.size() || src.kind() != dst.kind() {
            return Err(ModelError::Mismatch(format!(
                "{name}: expected {:?} {:?}, got {:?} {:?}",
                dst.kind(),
                dst.size(),
                src.kind(),
                src.size()
            )));
        }
        if src.is_floating_point() && !bool::try_from(src.isfinite().all())? {
            return Err(ModelError::Mismatch(format!("{name}: contains NaN or Inf")));
        }
    }
    Ok(())
}

/// Fails unless every floating-point tensor is finite (a diverged step must not replace
/// the last good checkpoint).
pub fn check_finite(tensors: &NamedTensors) -> Result<()> {
    for (name, t) in tensors {
        if t.is_floating_point() && !bool::try_from(t.isfinite().all())? {
            return Err(ModelError::Mismatch(format!(
                "{name}: contains NaN or Inf; not saved"
            )));
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` via a temporary file, fsync and rename (never a torn file).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| ModelError::Io {
        path: path.display().to_string(),
        source,
    };
    // A per-process temporary name: two writers never rename each other's half-file.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads a whole file with the path in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// blake3 of bytes, hex.
pub fn content_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NamedTensors {
        let mut m = NamedTensors::new();
        m.insert("a".into(), Tensor::from_slice(&[1.0f32, 2.0, 3.0]));
        m.insert("b".into(), Tensor::from_slice(&[4i64, 5]).view([2, 1]));
        m
    }

    #[test]
    fn round_trip_keeps_values_and_metadata() {
        let meta = BTreeMap::from([("step".to_string(), "7".to_string())]);
        let bytes = to_bytes(&sample(), &meta).unwrap();
        let (back, meta2) = from_bytes(&bytes).unwrap();
        assert_eq!(meta2, meta);
        for (k, v) in sample() {
            assert!(back[&k].equal(&v));
        }
    }

    #[test]
    fn corrupt_and_mismatched_inputs_are_refused_without_touching_target() {
        let bytes = to_bytes(&sample(), &BTreeMap::new()).unwrap();
        assert!(matches!(
            from_bytes(&bytes[..bytes.len() - 3]),
            Err(ModelError::Corrupt(_))
        ));
        assert!(from_bytes(b"").is_err());
        assert!(from_bytes(&[0xff; 64]).is_err());

        let target = sample();
        let mut wrong = sample();
        wrong.insert("a".into(), Tensor::from_slice(&[1.0f32, 2.0]));
        assert!(load_strict(&target, &wrong).is_err());
        let mut nan = sample();
        nan.insert("a".into(), Tensor::from_slice(&[9.0f32, f32::NAN, 9.0]));
        let mut extra = sample();
        extra.insert("c".into(), Tensor::from_slice(&[1.0f32]));
        assert!(load_strict(&target, &nan).is_err());
        assert!(load_strict(&target, &extra).is_err());
        assert_eq!(
            target["a"].double_value(&[0]),
            1.0,
            "a refused load must not copy"
        );
    }
}
