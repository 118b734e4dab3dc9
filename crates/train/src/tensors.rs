//! Between libtorch tensors (what trains) and the protocol's dense `f32` arrays (what
//! crosses the wire and what the coordinator merges).
use blocktrain_model::checkpoint::NamedTensors;
use blocktrain_protocol::codec::{Array, Arrays};
use tch::{Device, Kind};

use crate::{NodeError, Result};

/// Copies named tensors to host `f32` arrays.
pub fn to_arrays(tensors: &NamedTensors) -> Result<Arrays> {
    let mut out = Arrays::new();
    for (name, t) in tensors {
        let flat = t
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .flatten(0, -1);
        let data = Vec::<f32>::try_from(&flat)
            .map_err(|e| NodeError::Config(format!("{name}: cannot read tensor: {e}")))?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        out.insert(name.clone(), Array { shape, data });
    }
    Ok(out)
}

/// `new - old`, name by name (same names and shapes).
pub fn delta(new: &Arrays, old: &Arrays) -> Arrays {
    new.iter()
        .map(|(name, a)| {
            let data = a
                .data
                .iter()
                .zip(&old[name].data)
                .map(|(n, o)| n - o)
                .collect();
            (
                name.clone(),
                Array {
                    shape: a.shape.clone(),
                    data,
                },
            )
        })
        .collect()
}
