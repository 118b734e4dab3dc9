//! Vetting an admitted upload without the coordinator's lock: decode, norm and codec
//! checks, held-out screening and a spot check ([`VetJob::run`]); the job owns all it
//! needs, taken from the state by [`Coordinator::admit_update`].
use std::sync::{Arc, Mutex};

use super::*;
use crate::store::LeaseRow;
use crate::verify::Screen;

/// An upload that passed the cheap checks, with what the expensive ones need.
pub struct VetJob {
    pub(super) key: String,
    pub(super) lease: LeaseRow,
    pub(super) body: Vec<u8>,
    pub(super) body_hash: String,
    pub(super) claim: (Claim, String),
    pub(super) loss: Option<f64>,
    pub(super) shapes: Shapes,
    /// Most RMS any tensor of the delta may have, and least RMS the whole delta must.
    pub(super) rms_bounds: (f64, f64),
    /// Most L2 norm the moments' delta may have, first moments and roots each
    /// ([`crate::moments`]); unused when the run does not carry them.
    pub(super) moment_bound: f64,
    pub(super) codec: Codec,
    pub(super) screen: Option<ScreenJob>,
    pub(super) spot: Option<SpotJob>,
}

impl std::fmt::Debug for VetJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VetJob(lease {}, {} bytes)",
            self.lease.id,
            self.body.len()
        )
    }
}

/// Held-out screening of one update: the block's weights it applies to, their loss,
/// and the threshold at admission.
pub(super) struct ScreenJob {
    pub(super) screen: Arc<Mutex<Screen>>,
    pub(super) base: Arc<Arrays>,
    pub(super) before: f64,
    pub(super) threshold: f64,
    /// Share of the delta a merge applies (s(k) for an update k versions old; 1 fresh).
    pub(super) scale: f32,
    /// k at admission: versions the block had moved past the lease's base. The decision
    /// takes the screen's verdict only at this k (base and scale describe that merge).
    pub(super) staleness: u64,
}

/// A spot check's inputs: the checkpoint file the worker downloaded, its lease and the
/// training corpus.
pub(super) struct SpotJob {
    pub(super) manifest: Arc<Manifest>,
    pub(super) wire_path: PathBuf,
    pub(super) reply: Lease,
    pub(super) corpus: Arc<Vec<u8>>,
}

/// What [`Coordinator::admit_update`] found.
#[derive(Debug)]
pub enum Admitted {
    /// A re-sent upload (its reply was lost): the first reply again.
    Replayed(UpdateReply),
    /// To be vetted (off the lock), then decided.
    Vet(Box<VetJob>),
}

/// Why vetting refused an update.
#[derive(Debug)]
pub(super) enum Refusal {
    /// The update is refused; the worker may ask for new work.
    Refused(String),
    /// A spot check proved it false: refused, and the worker gets no more work.
    Flagged(String),
}

/// A vetted upload, ready for [`Coordinator::decide`].
#[derive(Debug)]
pub struct Vetted {
    pub(super) job: Box<VetJob>,
    pub(super) outcome: std::result::Result<Verdict, Refusal>,
}

impl VetJob {
    /// The lease this upload is for.
    pub fn lease_id(&self) -> i64 {
        self.lease.id
    }

    /// The block the upload is for.
    pub fn block(&self) -> usize {
        self.lease.block
    }

    /// The expensive checks, without the coordinator: decode, norms, codec, held-out
    /// screening, spot check.
    pub fn run(self) -> Vetted {
        let outcome = self.vet();
        Vetted {
            job: Box::new(self),
            outcome,
        }
    }

    fn vet(&self) -> std::result::Result<Verdict, Refusal> {
        let refused = |m: String| Refusal::Refused(m);
        let limit = update_limit(&self.shapes) as usize;
        let (delta, codec) =
            codec::decode(&self.body, &self.shapes, limit).map_err(|e| refused(e.to_string()))?;
        let (most, least) = self.rms_bounds;
        let (mut squares, mut values) = (0.0, 0usize);
        // Weights only: a moment's delta is not bounded by the learning rate.
        for (name, a) in delta.iter().filter(|(n, _)| !crate::moments::is_moment(n)) {
            let rms = merge::rms(a);
            if rms > most {
                return Err(refused(format!(
                    "{name}: delta RMS {rms:.3e} exceeds {most:.3e} (max_delta_ratio x lr x {} steps): no AdamW run moves weights that far",
                    self.lease.steps
                )));
            }
            squares += rms * rms * a.data.len() as f64;
            values += a.data.len();
        }
        // Honest moments stay within the gradient clip in L2 (first moments and roots
        // alike; `moments::project`), so a delta between two of them stays within twice it.
        let (dm, dr) = crate::moments::delta_norms(&delta);
        if dm.max(dr) > self.moment_bound {
            return Err(refused(format!(
                "optimizer-state delta of L2 norm {:.3e} (first moments) and {:.3e} (roots) exceeds {:.3e} (2.2 x grad_clip): honest AdamW moments cannot move that far",
                dm, dr, self.moment_bound
            )));
        }
        let overall = (squares / values.max(1) as f64).sqrt();
        if overall < least {
            return Err(refused(format!(
                "empty update: the delta's RMS {overall:.3e} is below {least:.3e}; {} steps of training move weights further",
                self.lease.steps
            )));
        }
        // At least as precise as the run's codec: a worker cannot pick a lossier one
        // (whose looser spot-check tolerance, or none for top-k, it could hide behind).
        let rank = |c: &Codec| match c {
            Codec::Fp32 => 0,
            Codec::Fp16 => 1,
            Codec::Int8 { .. } => 2,
            Codec::TopK { .. } => 3,
        };
        if rank(&codec) > rank(&self.codec) {
            return Err(refused(format!(
                "update encoded as {codec:?}, lossier than this run's {:?}",
                self.codec
            )));
        }
        let heldout = match &self.screen {
            Some(s) => Some(screen(s, self.lease.block, &delta)?),
            None => None,
        };
        if let Some(spot) = &self.spot {
            spot_check(spot, &self.lease, &delta, &codec)?;
        }
        Ok(Verdict { heldout })
    }
}

/// Held-out screening: the block's loss after this update alone, against before. The
/// refusal gives no losses: the screen is secret, and its numbers would let a worker
/// tune an update against it.
fn screen(
    job: &ScreenJob,
    block: usize,
    delta: &Arrays,
) -> std::result::Result<(f64, f64), Refusal> {
    let mut after = (*job.base).clone();
    for (name, w) in after.iter_mut() {
        w.data
            .iter_mut()
            .zip(&delta[name].data)
            .for_each(|(w, d)| *w += job.scale * d);
    }
    let loss = job
        .screen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .loss(&after);
    let after = loss.map_err(|e| {
        tracing::error!("block {}: screening could not run: {e}", block + 1);
        Refusal::Refused(
            "held-out screening could not run here (the coordinator's fault); the update is not accepted unverified: ask for new work".into(),
        )
    })?;
    if !after.is_finite() || after - job.before > job.threshold {
        return Err(Refusal::Refused(format!(
            "held-out screening: this update alone makes block {}'s held-out loss worse than honest updates do",
            block + 1
        )));
    }
    Ok((job.before, after))
}

/// Spot check: recompute the update from the same start weights, shard, seed and steps
/// and compare. A mismatch flags the worker; a recomputation that cannot run refuses the
/// update (never passes it unverified) without blaming the worker.
fn spot_check(
    job: &SpotJob,
    lease: &LeaseRow,
    delta: &Arrays,
    codec: &Codec,
) -> std::result::Result<(), Refusal> {
    let check = recompute(job, lease, delta, codec).map_err(|e| {
        tracing::error!("spot check of lease {} could not run: {e}", lease.id);
        Refusal::Refused(
            "spot check could not run here (the coordinator's fault); the update is not accepted unverified: ask for new work".into(),
        )
    })?;
    if check.passed() {
        tracing::info!(
            "spot check of lease {} passed (relative error {:.2e})",
            lease.id,
            check.error
        );
        return Ok(());
    }
    Err(Refusal::Flagged(format!(
        "spot check: recomputing this update from the same start weights, data, seed and steps gives a different delta (relative error {:.3} > tolerance {:.1e})",
        check.error, check.tolerance
    )))
}

fn recompute(
    job: &SpotJob,
    lease: &LeaseRow,
    delta: &Arrays,
    codec: &Codec,
) -> Result<crate::verify::SpotCheck> {
    let bytes = std::fs::read(&job.wire_path).map_err(crate::io_err(&job.wire_path))?;
    let state = crate::local_train::decode_checkpoint(&bytes)
        .map_err(|e| NodeError::Config(e.to_string()))?;
    // The moments the worker started from ride in the same file (none: zero moments).
    let (base, moments) = crate::moments::split(state);
    let moments = (job.reply.carry_moments && !moments.is_empty()).then_some(moments);
    let shard = crate::local_train::shard_of(
        &job.corpus,
        job.reply.shard_index,
        job.reply.shard_count,
        job.manifest.model.window,
    );
    let local = crate::local_train::LocalJob {
        manifest: &job.manifest,
        block: lease.block,
        base: &base,
        lease: &job.reply,
        shard,
        moments: moments.as_ref(),
    };
    crate::verify::spot_check(&local, delta, codec, tch::Device::Cpu)
}
