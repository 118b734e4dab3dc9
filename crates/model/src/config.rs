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
    /// Embedding-space Gaussian diffusion (the paper's family): the network reads a noisy
    /// latent instead of byte ids. None: byte ids (masked diffusion, AR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edm: Option<EdmConfig>,
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
            edm: None,
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
            edm: None,
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
        if let Some(edm) = &self.edm {
            if self.causal {
                return bad("embedding diffusion (edm) needs bidirectional attention");
            }
            edm.validate()?;
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> i64 {
        self.d_model / self.n_heads
    }
}

/// Embedding-space Gaussian diffusion as DiffusionBlocks runs it: `z = e(x) + sigma * eps`
/// on a fixed byte embedding shared by every block, EDM preconditioning, and sigma drawn
/// from a lognormal (`ln sigma ~ N(p_mean, p_std^2)`) restricted to
/// `[sigma_min, sigma_max]`.
///
/// A run's [`Schedule`] boundaries are then fractions of that restricted lognormal's
/// probability mass, not noise levels: `Schedule::equal(B)` is DiffusionBlocks'
/// equal-mass partition, and [`EdmConfig::sigma_at`] turns a boundary into a sigma.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdmConfig {
    /// Width of the byte embedding (the latent's last dimension). With `sigma_data` it
    /// sets how much of the byte a noisy latent still shows at a given sigma.
    pub embed_dim: i64,
    /// RMS of one embedding coordinate: EDM's sigma_data, used by its preconditioning.
    pub sigma_data: f64,
    /// Lowest noise level: generation ends here, and the bound's reconstruction term
    /// is scored here. The paper keeps it at 1 against target leakage.
    pub sigma_min: f64,
    /// Highest noise level: generation starts from the prior here.
    pub sigma_max: f64,
    /// Mean of ln sigma in training (EDM and DiffusionBlocks: -1.2).
    pub p_mean: f64,
    /// Standard deviation of ln sigma in training (EDM and DiffusionBlocks: 1.2).
    pub p_std: f64,
    /// DiffusionBlocks' overlap gamma: in training only, block `[lo, hi]` also draws
    /// from `[lo / a, hi * a]` with `a = (hi / lo)^gamma` (clipped to the range).
    pub overlap: f64,
    /// Seeds the fixed embedding table (the same table for every block of a run).
    pub embed_seed: u64,
}

impl Default for EdmConfig {
    fn default() -> Self {
        EdmConfig {
            embed_dim: 128,
            sigma_data: 0.5,
            sigma_min: 1.0,
            sigma_max: 10.0,
            p_mean: -1.2,
            p_std: 1.2,
            overlap: 0.1,
            embed_seed: 0,
        }
    }
}

fn std_normal() -> statrs::distribution::Normal {
    statrs::distribution::Normal::new(0.0, 1.0).expect("the standard normal exists")
}

impl EdmConfig {
    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(format!("edm: {m}")));
        if self.embed_dim < 1 {
            return bad(format!(
                "embed_dim must be positive, got {}",
                self.embed_dim
            ));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !(positive(self.sigma_data) && positive(self.p_std) && self.p_mean.is_finite()) {
            return bad("sigma_data and p_std must be positive and p_mean finite".into());
        }
        if !(positive(self.sigma_min)
            && positive(self.sigma_max)
            && self.sigma_min < self.sigma_max)
        {
            return bad(format!(
                "need 0 < sigma_min < sigma_max, got [{}, {}]",
                self.sigma_min, self.sigma_max
            ));
        }
        if self.sigma_max > 1000.0 {
            // The latent crosses between blocks as f16 (largest finite value 65504).
            return bad(format!(
                "sigma_max must be at most 1000 (the latent travels as f16), got {}",
                self.sigma_max
            ));
        }
        if !(0.0..1.0).contains(&self.overlap) {
            return bad(format!("overlap must be in [0, 1), got {}", self.overlap));
        }
        let (qa, qb) = self.mass_range();
        if qb - qa < 1e-9 {
            return bad(format!(
                "the lognormal (p_mean {}, p_std {}) has no mass in [{}, {}]",
                self.p_mean, self.p_std, self.sigma_min, self.sigma_max
            ));
        }
        Ok(())
    }

    /// Standard-normal CDF at ln sigma's z-score: the unrestricted lognormal's mass below sigma.
    fn cdf(&self, sigma: f64) -> f64 {
        use statrs::distribution::ContinuousCDF;
        std_normal().cdf((sigma.ln() - self.p_mean) / self.p_std)
    }

    /// The unrestricted lognormal's mass below `sigma_min` and below `sigma_max`.
    pub fn mass_range(&self) -> (f64, f64) {
        (self.cdf(self.sigma_min), self.cdf(self.sigma_max))
    }

    /// The sigma below which a fraction `u` of the restricted lognormal's mass lies
    /// (`sigma_at(0) = sigma_min`, `sigma_at(1) = sigma_max`).
    pub fn sigma_at(&self, u: f64) -> f64 {
        use statrs::distribution::ContinuousCDF;
        if u <= 0.0 {
            return self.sigma_min;
        }
        if u >= 1.0 {
            return self.sigma_max;
        }
        let (qa, qb) = self.mass_range();
        let q = qa + u * (qb - qa);
        (self.p_mean + self.p_std * std_normal().inverse_cdf(q))
            .exp()
            .clamp(self.sigma_min, self.sigma_max)
    }

    /// Inverse of [`EdmConfig::sigma_at`]: the fraction of the restricted mass below `sigma`.
    pub fn mass_of(&self, sigma: f64) -> f64 {
        let (qa, qb) = self.mass_range();
        ((self.cdf(sigma) - qa) / (qb - qa)).clamp(0.0, 1.0)
    }

    /// The noise levels of a schedule's boundaries (mass fractions), ascending.
    pub fn sigma_bounds(&self, schedule: &Schedule) -> Vec<f64> {
        schedule
            .boundaries
            .iter()
            .map(|&u| self.sigma_at(u))
            .collect()
    }

    /// The range block `[lo, hi]` trains on: widened by the overlap at both ends in
    /// log-sigma (DiffusionBlocks' `(hi / lo)^gamma`), never past the run's range.
    pub fn training_range(&self, lo: f64, hi: f64) -> (f64, f64) {
        let a = (hi / lo).powf(self.overlap);
        ((lo / a).max(self.sigma_min), (hi * a).min(self.sigma_max))
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

    /// DiffusionBlocks' rule: equal slices of the restricted lognormal's mass. Checked
    /// against boundaries computed independently (Python's statistics.NormalDist) and by
    /// integrating the lognormal density numerically over each block's interval.
    #[test]
    fn equal_mass_partition_of_the_lognormal() {
        let edm = EdmConfig::default(); // [1, 10], p_mean -1.2, p_std 1.2
        let s = edm.sigma_bounds(&Schedule::equal(4));
        let expected = [1.0, 1.237_886, 1.623_241, 2.428_542, 10.0];
        for (got, want) in s.iter().zip(expected) {
            assert!((got - want).abs() < 1e-5, "{s:?} vs {expected:?}");
        }
        // Each interval holds a quarter of the restricted density's mass.
        let density = |sigma: f64| {
            let z = (sigma.ln() - edm.p_mean) / edm.p_std;
            (-0.5 * z * z).exp() / (sigma * edm.p_std * (2.0 * std::f64::consts::PI).sqrt())
        };
        let integral = |a: f64, b: f64| {
            let n = 20_000;
            let h = (b - a) / n as f64;
            (0..n)
                .map(|i| density(a + (i as f64 + 0.5) * h) * h)
                .sum::<f64>()
        };
        let total = integral(1.0, 10.0);
        for w in s.windows(2) {
            let share = integral(w[0], w[1]) / total;
            assert!((share - 0.25).abs() < 1e-4, "share {share} of {w:?}");
        }
        // mass_of inverts sigma_at; the full EDM range splits as DiffusionBlocks reports.
        for u in [0.1, 0.37, 0.9] {
            assert!((edm.mass_of(edm.sigma_at(u)) - u).abs() < 1e-9);
        }
        let full = EdmConfig {
            sigma_min: 0.002,
            sigma_max: 80.0,
            ..EdmConfig::default()
        };
        let f = full.sigma_bounds(&Schedule::equal(4));
        for (got, want) in f.iter().zip([0.002, 0.134, 0.301, 0.677, 80.0]) {
            assert!((got - want).abs() < 1e-3, "{f:?}");
        }
        // The overlap widens both ends by gamma of the log width, inside the range.
        let (a, b) = edm.training_range(s[1], s[2]);
        let gamma = (s[2] / s[1]).powf(0.1);
        assert!((a - s[1] / gamma).abs() < 1e-12 && (b - s[2] * gamma).abs() < 1e-12);
        assert_eq!(edm.training_range(1.0, 2.0).0, 1.0);
        assert!(EdmConfig {
            sigma_min: 3.0,
            sigma_max: 2.0,
            ..edm.clone()
        }
        .validate()
        .is_err());
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
