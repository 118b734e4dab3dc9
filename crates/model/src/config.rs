//! Network shape and block schedule.
use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

/// Shape of one network (a block, the E2E reference or the AR reference).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Width of the residual stream.
    pub d_model: i64,
    /// Transformer layers in this network.
    pub n_layers: i64,
    /// Attention heads; `d_model / n_heads` must be even (rotary halves).
    pub n_heads: i64,
    /// MLP hidden width as a multiple of `d_model`.
    pub mlp_ratio: i64,
    /// Bytes per training window; rotary tables are built for this length.
    pub window: i64,
    /// Causal attention (the AR reference) instead of bidirectional.
    pub causal: bool,
    /// Add an embedding of the masking level t to every position (diffusion only).
    pub t_cond: bool,
}

impl ModelConfig {
    /// The 2-core starting point: 2 layers, d 128, 4 heads, window 128.
    pub fn small_block() -> Self {
        ModelConfig {
            d_model: 128,
            n_layers: 2,
            n_heads: 4,
            mlp_ratio: 4,
            window: 128,
            causal: false,
            t_cond: false,
        }
    }

    /// The smallest useful network (width 16, one layer, window 16): for tests.
    pub fn tiny_block() -> Self {
        ModelConfig {
            d_model: 16,
            n_layers: 1,
            n_heads: 2,
            mlp_ratio: 2,
            window: 16,
            causal: false,
            t_cond: false,
        }
    }

    /// Rejects shapes that cannot build.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(ModelError::Config(m.to_string()));
        if self.d_model <= 0
            || self.n_layers <= 0
            || self.n_heads <= 0
            || self.window <= 1
            || self.mlp_ratio <= 0
        {
            return bad("d_model, n_layers, n_heads, mlp_ratio must be positive and window > 1");
        }
        if self.d_model % self.n_heads != 0 || (self.d_model / self.n_heads) % 2 != 0 {
            return bad("d_model must split into n_heads heads of even width");
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> i64 {
        self.d_model / self.n_heads
    }
}

/// Interval boundaries `0 = t0 < t1 < ... < tB = 1`; block b (1-based) owns `[t(b-1), t(b)]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// The B+1 boundaries.
    pub boundaries: Vec<f64>,
}

impl Schedule {
    /// Equal slices `t(b) = b/B`, the published block-wise default.
    pub fn equal(blocks: usize) -> Self {
        Schedule {
            boundaries: (0..=blocks).map(|b| b as f64 / blocks as f64).collect(),
        }
    }

    /// Explicit boundaries, checked.
    pub fn from_boundaries(boundaries: Vec<f64>) -> Result<Self> {
        let s = Schedule { boundaries };
        s.validate()?;
        Ok(s)
    }

    /// Boundaries must start at 0, end at 1 and increase strictly.
    pub fn validate(&self) -> Result<()> {
        let b = &self.boundaries;
        let ok = b.len() >= 2
            && b[0] == 0.0
            && *b.last().unwrap() == 1.0
            && b.windows(2).all(|w| w[0] < w[1]);
        if ok {
            Ok(())
        } else {
            Err(ModelError::Config(format!(
                "schedule boundaries must rise strictly from 0 to 1, got {b:?}"
            )))
        }
    }

    /// Number of blocks B.
    pub fn blocks(&self) -> usize {
        self.boundaries.len() - 1
    }

    /// `(t(b-1), t(b))` for the 0-based block index `idx`.
    pub fn interval(&self, idx: usize) -> (f64, f64) {
        (self.boundaries[idx], self.boundaries[idx + 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_schedule_covers_unit_interval() {
        let s = Schedule::equal(4);
        assert_eq!(s.blocks(), 4);
        assert_eq!(s.interval(0), (0.0, 0.25));
        assert_eq!(s.interval(3), (0.75, 1.0));
        let width: f64 = (0..4).map(|i| s.interval(i).1 - s.interval(i).0).sum();
        assert!((width - 1.0).abs() < 1e-12);
    }

    #[test]
    fn bad_schedules_and_shapes_are_rejected() {
        assert!(Schedule::from_boundaries(vec![0.0, 0.6, 0.5, 1.0]).is_err());
        assert!(Schedule::from_boundaries(vec![0.1, 1.0]).is_err());
        let mut c = ModelConfig::small_block();
        c.n_heads = 3;
        assert!(c.validate().is_err());
    }
}
