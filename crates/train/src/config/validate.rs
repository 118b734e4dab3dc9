//! [`RunConfig::validate`]: the checks that refuse a `run.toml` which cannot run (bad
//! ranges, settings that contradict each other, codecs and keys that do not parse).
//! Kept apart from the settings and their defaults (`config.rs`, the file's format):
//! these rules cut across its tables.
use blocktrain_protocol::codec::Codec;

use super::{OptimizerState, RunConfig};
use crate::{NodeError, Result};

impl RunConfig {
    /// Rejects settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(NodeError::Config(m));
        let tr = &self.trust;
        let trust_ok = (0.0..=1.0).contains(&tr.spot_check_fraction)
            && tr.screen_threshold.is_finite()
            && tr.screen_threshold >= 0.0;
        if !trust_ok {
            return bad(format!(
                "trust: spot_check_fraction must be in [0, 1] and screen_threshold >= 0 (got {} and {})",
                tr.spot_check_fraction, tr.screen_threshold
            ));
        }
        if self.model.edm.is_some() {
            return bad(
                "model: embedding-diffusion settings go in [edm], with objective = \"edm\"".into(),
            );
        }
        let t = &self.training;
        if self.blocks == 0 {
            return bad("blocks must be at least 1".into());
        }
        if t.rounds == 0 || t.local_steps < 1 || t.batch < 1 || t.workers_per_block == 0 {
            return bad(
                "training: rounds, local_steps, batch and workers_per_block must be >= 1".into(),
            );
        }
        if t.min_updates > t.workers_per_block {
            return bad("training.min_updates cannot exceed workers_per_block".into());
        }
        if t.round_seconds.is_nan() || t.round_seconds < 0.0 {
            return bad("training.round_seconds must be >= 0".into());
        }
        if !(t.staleness_exponent.is_finite() && t.staleness_exponent >= 0.0) {
            return bad(format!(
                "training.staleness_exponent must be a finite number >= 0 (got {})",
                t.staleness_exponent
            ));
        }
        if t.optimizer_state == OptimizerState::Carry
            && (self.optim.grad_clip.is_nan() || self.optim.grad_clip <= 0.0)
        {
            return bad(
                "training.optimizer_state = \"carry\" needs optim.grad_clip > 0: the clip bounds \
                 the moments the coordinator accepts and serves"
                    .into(),
            );
        }
        if t.max_staleness > t.rounds {
            return bad(format!(
                "training.max_staleness = {} exceeds rounds = {}: no update can be that stale",
                t.max_staleness, t.rounds
            ));
        }
        let keep = self.faults.keep_versions;
        if t.max_staleness > 0 && keep != 0 && keep <= t.max_staleness {
            return bad(format!(
                "faults.keep_versions = {keep} with training.max_staleness = {}: a stale \
                 update's spot check recomputes it from the file of the version it was \
                 trained from, so keep_versions must be 0 (keep all) or more than \
                 max_staleness (at least {})",
                t.max_staleness,
                t.max_staleness + 1
            ));
        }
        Codec::parse(&self.wire.codec).map_err(|e| NodeError::Config(e.to_string()))?;
        if !matches!(
            self.wire.checkpoint_codec.as_str(),
            "fp32" | "fp16" | "int8"
        ) {
            return bad(format!(
                "wire.checkpoint_codec is fp32, fp16 or int8, not '{}'",
                self.wire.checkpoint_codec
            ));
        }
        if self.wire.max_delta_ratio.is_nan() || self.wire.max_delta_ratio <= 0.0 {
            return bad("wire.max_delta_ratio must be > 0".into());
        }
        if self.outer.lr.is_nan()
            || self.outer.lr <= 0.0
            || !(0.0..1.0).contains(&self.outer.momentum)
        {
            return bad("outer: lr must be > 0 and momentum in [0, 1)".into());
        }
        self.outer.merge_rule()?;
        let f = &self.faults;
        if !(f.lease_secs > 0.0
            && f.round_timeout_secs > 0.0
            && f.max_skew_secs > 0.0
            && f.max_lease_secs > 0.0)
        {
            return bad("faults: every timeout must be > 0".into());
        }
        for key in &self.auth.allow {
            if key.len() != 64 || hex::decode(key).is_err() {
                return bad(format!(
                    "auth.allow: '{key}' is not a 64-hex-digit public key"
                ));
            }
        }
        self.edm.validate()?;
        self.manifest().map(|_| ())
    }
}
