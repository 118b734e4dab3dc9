//! The core's rules, read from the run's configuration and model shape.
use blocktrain_model::run::Manifest;
use blocktrain_protocol::codec::Shapes;

use crate::config::RunConfig;
use crate::core::{Admission, Rules};

/// The core's rules from the run's configuration.
pub(super) fn rules_of(cfg: &RunConfig, manifest: &Manifest, shapes: &[Shapes]) -> Rules {
    let (t, f) = (&cfg.training, &cfg.faults);
    let ms = |secs: f64| (secs * 1000.0) as u64;
    Rules {
        blocks: cfg.blocks,
        rounds: t.rounds,
        workers_per_block: t.workers_per_block,
        quorum: cfg.quorum(),
        lease_ms: ms(f.lease_secs),
        max_lease_ms: ms(f.max_lease_secs),
        round_timeout_ms: ms(f.round_timeout_secs),
        max_staleness: t.max_staleness,
        stall_ms: ms(3.0 * f.round_timeout_secs.max(f.lease_secs)),
        local_steps: t.local_steps,
        round_seconds: t.round_seconds,
        schedule_total: cfg.schedule_total(),
        batch: t.batch,
        codec: cfg.wire.codec.clone(),
        carry_moments: cfg.training.optimizer_state == crate::config::OptimizerState::Carry,
        spot_check_fraction: cfg.trust.spot_check_fraction,
        run_seed: cfg.seed,
        train_memory: (0..cfg.blocks)
            .map(|b| train_memory(cfg, manifest, &shapes[b], b))
            .collect(),
        admission: Admission {
            allow: cfg.auth.allow.clone(),
            join_secret: cfg.auth.join_secret.clone(),
            invites: cfg.auth.invites.clone(),
        },
    }
}

/// Rough memory to train block `b`: weights, gradients and two AdamW moments (16 B per
/// parameter), activations kept for backward (~40 B per width x layer x token of a
/// batch, plus the logits), and the corpus and runtime (~256 MB).
fn train_memory(cfg: &RunConfig, manifest: &Manifest, shapes: &Shapes, b: usize) -> u64 {
    let params: usize = shapes.values().map(|s| s.iter().product::<usize>()).sum();
    let m = manifest.part_model(b);
    let tokens = (cfg.training.batch * m.window) as u64;
    16 * params as u64 + tokens * (40 * (m.d_model * m.n_layers) as u64 + 3 * 4 * 257) + (256 << 20)
}
