//! A lease's local computation, as a pure function of public inputs (checkpoint, shard,
//! lease): what the worker trains and what a checking coordinator recomputes
//! (`verify`'s spot check). Its own module, owned by neither side, so the worker and
//! the coordinator both depend on it and not on each other.
use std::sync::{Mutex, MutexGuard};

use blocktrain_model::data::WindowSampler;
use blocktrain_model::run::Manifest;
use blocktrain_model::trainer::Trainer;
use blocktrain_protocol::codec::{self, Arrays, Codec};
use blocktrain_protocol::wire::Lease;
use tch::{Device, Kind};

use crate::tensors::{delta, to_arrays};
use crate::{NodeError, Result};

/// Everything a lease's local training depends on: the worker and a checking
/// coordinator build the same job and get the same update.
#[derive(Clone, Copy, Debug)]
pub struct LocalJob<'a> {
    /// The run (block shapes, objectives, inner optimizer).
    pub manifest: &'a Manifest,
    /// Block index, 0-based.
    pub block: usize,
    /// Start weights: the checkpoint exactly as the worker decoded it
    /// ([`decode_checkpoint`] of the served bytes), not the coordinator's fp32 master.
    pub base: &'a Arrays,
    /// Steps, batch, seed and schedule position.
    pub lease: &'a Lease,
    /// The bytes windows are drawn from ([`shard_of`] of the run's train split, or a
    /// worker's own data).
    pub shard: &'a [u8],
    /// AdamW moments to start from, as they travel ([`crate::moments`]: `adam.m/NAME`,
    /// `adam.rms/NAME`), exactly as the worker decoded them from the served checkpoint;
    /// None starts from zero moments.
    pub moments: Option<&'a Arrays>,
}

/// What a lease's local training produced.
#[derive(Clone, Debug)]
pub struct Trained {
    /// Trained weights minus the base.
    pub delta: Arrays,
    /// Mean training loss over the lease's steps.
    pub loss: f64,
    /// The AdamW moments after the last step, as they travel ([`crate::moments`]): what
    /// the block's optimizer state becomes when the run carries it.
    pub moments: Arrays,
}

/// Trains `job` from its start moments (zero when it has none) and returns the delta
/// (trained - base), the mean training loss and the moments after training, or None once
/// `keep_going()` turns false (checked before each step).
///
/// Carried moments resume bias correction at the lease's schedule position (the serial
/// steps the block has taken), fresh ones at zero: both are public inputs, so a checking
/// coordinator sets the same count.
///
/// Step i of H' local steps sits at `schedule_step + i * span / H'` of the block's LR
/// schedule; windows come from a sampler seeded by the lease seed and the masks of step
/// i from `seed + i`, so nothing depends on the caller's history. Bit-identical results
/// need the same inputs on the same device type, libtorch build and intra-op thread
/// count (CPU reductions split by thread); across thread counts the results differ
/// by float rounding only (see `verify`). Holds [`torch_rng`] around every draw.
pub fn train_delta(
    job: &LocalJob,
    device: Device,
    keep_going: &dyn Fn() -> bool,
) -> Result<Option<Trained>> {
    let LocalJob {
        manifest,
        block,
        base,
        lease,
        shard,
        moments,
    } = *job;
    let state = manifest.parts.get(block).ok_or_else(|| {
        NodeError::Rejected(format!(
            "lease names block {} of {}",
            block + 1,
            manifest.parts.len()
        ))
    })?;
    let mut trainer = {
        let _rng = torch_rng(); // Trainer::new seeds the global generator
        Trainer::new(
            &manifest.part_model(block),
            state.objective,
            manifest.optim.clone(),
            device,
            lease.seed as i64,
        )?
    };
    trainer.load_weights(&codec::encode(base, Codec::Fp32))?;
    if let Some(m) = moments {
        let m = crate::moments::to_trainer(m);
        trainer.load_moments(&codec::encode(&m, Codec::Fp32), lease.schedule_step.max(0))?;
    }
    let mut sampler = WindowSampler::new(shard, manifest.model.window, lease.seed, device)?;
    let mut loss_sum = tch::Tensor::zeros([], (Kind::Float, device));
    let span = lease.schedule_span.max(1);
    for i in 0..lease.steps {
        if !keep_going() {
            return Ok(None);
        }
        let x = sampler.next_batch(lease.batch);
        let pos = lease.schedule_step + i * span / lease.steps.max(1);
        let lr = trainer.optim.lr_at(pos, lease.schedule_total);
        let noise_seed = (lease.seed as i64).wrapping_add(i);
        let _rng = torch_rng();
        loss_sum += trainer.train_step_with(&x, lr, noise_seed);
    }
    let loss = loss_sum.double_value(&[]) / lease.steps.max(1) as f64;
    Ok(Some(Trained {
        delta: delta(&to_arrays(&trainer.weights())?, base),
        loss,
        moments: crate::moments::to_wire(to_arrays(&trainer.moments())?),
    }))
}

impl Trained {
    /// What the worker uploads for `job`: the weights' delta and, when the lease carries
    /// optimizer state, the moments' delta (end minus the moments it started from,
    /// zero when it had none; [`crate::moments`]).
    pub fn update(self, job: &LocalJob) -> Arrays {
        if !job.lease.carry_moments {
            return self.delta;
        }
        let start = match job.moments {
            Some(m) => m.clone(),
            None => crate::moments::zeros(
                &self
                    .delta
                    .iter()
                    .map(|(n, a)| (n.clone(), a.shape.clone()))
                    .collect(),
            ),
        };
        crate::moments::join(self.delta, delta(&self.moments, &start))
    }
}

/// A served checkpoint's weights (safetensors in the run's checkpoint codec), decoded
/// against the shapes its own header declares.
pub fn decode_checkpoint(bytes: &[u8]) -> blocktrain_protocol::Result<Arrays> {
    let shapes = codec::header_shapes(bytes)?;
    Ok(codec::decode(bytes, &shapes, usize::MAX)?.0)
}

/// Serialises use of libtorch's process-wide random generator: a step seeds it and then
/// draws its masks, and another thread seeding in between (a second trainer, a
/// coordinator's check) would change those draws. Everything in this crate that seeds
/// libtorch holds this while it seeds and draws.
pub fn torch_rng() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Slice `index` of `count` equal slices of `corpus` (the whole corpus when a slice
/// would be two windows or less): the bytes a lease's shard fields name.
pub fn shard_of(corpus: &[u8], index: u32, count: u32, window: i64) -> &[u8] {
    let count = count.max(1) as usize;
    let len = corpus.len() / count;
    if len <= 2 * window as usize {
        return corpus;
    }
    let start = (index as usize % count) * len;
    &corpus[start..start + len]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_disjoint_slices() {
        let c: Vec<u8> = (0..100).collect();
        assert_eq!(shard_of(&c, 0, 2, 4), &c[..50]);
        assert_eq!(shard_of(&c, 1, 2, 4), &c[50..]);
        assert_eq!(shard_of(&c, 3, 2, 4), &c[50..]);
        assert_eq!(shard_of(&c, 0, 2, 40).len(), 100, "too small to split");
    }
}
