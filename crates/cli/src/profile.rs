//! Named presets: one place for the defaults of every size of run.
use blocktrain_model::config::ModelConfig;
use blocktrain_model::optim::OptimConfig;
use clap::ValueEnum;

/// Size presets. Flags given explicitly override a preset's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// Seconds: for tests and smoke checks.
    Tiny,
    /// A minute or two on 2 CPU cores: the README's first command.
    Demo,
    /// Tens of minutes per model on 2 cores: the comparison in docs/RESULTS.md.
    Quality,
    /// The sample-quality judge (`blocktrain judge`): a wider AR network over 256-byte
    /// windows, trained once and kept out of every comparison. Train it with
    /// `--objective ar --blocks 1` (about 1.5 hours alone on 2 cores).
    Judge,
}

/// Everything a profile fixes.
pub struct Preset {
    /// One block's network (E2E/AR get `blocks x` its layers).
    pub block: ModelConfig,
    /// Optimizer steps per part.
    pub steps: i64,
    /// Windows per batch.
    pub batch: i64,
    /// Optimizer settings.
    pub optim: OptimConfig,
    /// Held-out windows for the evaluation that ends a demo (0 = all).
    pub eval_windows: usize,
}

impl Profile {
    /// The preset's values.
    pub fn preset(self) -> Preset {
        match self {
            Profile::Tiny => Preset {
                block: ModelConfig {
                    d_model: 32,
                    n_layers: 1,
                    n_heads: 2,
                    mlp_ratio: 4,
                    window: 32,
                    causal: false,
                    t_cond: false,
                    edm: None,
                },
                steps: 20,
                batch: 8,
                optim: OptimConfig {
                    lr: 3e-3,
                    warmup: 5,
                    ..Default::default()
                },
                eval_windows: 64,
            },
            Profile::Demo => Preset {
                block: ModelConfig::small_block(),
                steps: 300,
                batch: 32,
                optim: OptimConfig {
                    lr: 2e-3,
                    warmup: 20,
                    ..Default::default()
                },
                eval_windows: 800,
            },
            Profile::Judge => Preset {
                block: ModelConfig {
                    d_model: 256,
                    n_layers: 6,
                    n_heads: 8,
                    mlp_ratio: 4,
                    window: 256,
                    causal: true,
                    t_cond: false,
                    edm: None,
                },
                steps: 2000,
                batch: 16,
                optim: OptimConfig {
                    lr: 1e-3,
                    warmup: 100,
                    ..Default::default()
                },
                eval_windows: 0,
            },
            Profile::Quality => Preset {
                block: ModelConfig::small_block(),
                steps: 2400,
                batch: 32,
                optim: OptimConfig {
                    lr: 2e-3,
                    warmup: 100,
                    ..Default::default()
                },
                eval_windows: 0,
            },
        }
    }
}
