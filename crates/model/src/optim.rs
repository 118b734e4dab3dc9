//! AdamW with state we can checkpoint, gradient clipping, and the LR schedule.
//!
//! tch's `nn::Optimizer` wraps libtorch's C++ optimizer but gives no access to its
//! moment buffers, so a resumed run (and, later, a worker handing a block back)
//! would restart Adam cold. This is the same update as `torch.optim.AdamW`, done
//! in place on preallocated buffers: no per-step allocation of weights or state.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Optimizer and schedule settings (shared by blocks and references, so budgets match).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: i64,
    /// Cosine decay ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// AdamW betas.
    pub beta1: f64,
    /// AdamW betas.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-3,
            warmup: 100,
            min_lr_ratio: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 1.0,
        }
    }
}

impl OptimConfig {
    /// Learning rate at `step` of `total`: linear warm-up, then cosine to the floor.
    pub fn lr_at(&self, step: i64, total: i64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (total - self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).clamp(0.0, 1.0);
        let floor = self.lr * self.min_lr_ratio;
        floor + 0.5 * (self.lr - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// AdamW moments for one network's parameters, in `VarStore` order.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Tensor>,
    /// First moments, one per parameter.
    pub exp_avg: Vec<Tensor>,
    /// Second moments, one per parameter.
    pub exp_avg_sq: Vec<Tensor>,
    /// Updates applied so far (for bias correction).
    pub steps: i64,
    cfg: OptimConfig,
}

impl AdamW {
    /// Fresh state for `params` (shallow clones of the `VarStore` variables).
    pub fn new(params: Vec<Tensor>, cfg: OptimConfig) -> Self {
        let exp_avg = params.iter().map(Tensor::zeros_like).collect();
        let exp_avg_sq = params.iter().map(Tensor::zeros_like).collect();
        AdamW {
            params,
            exp_avg,
            exp_avg_sq,
            steps: 0,
            cfg,
        }
    }

    /// Zeroes gradients in place (every parameter gets a gradient each step).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    /// Scales gradients so their global L2 norm is at most `grad_clip`; returns the norm
    /// before clipping as a device scalar (no host sync).
    pub fn clip_grad_norm(&mut self) -> Tensor {
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        let total = Tensor::stack(&norms, 0).norm();
        if self.cfg.grad_clip > 0.0 {
            let scale = (self.cfg.grad_clip / (&total + 1e-6)).clamp_max(1.0);
            for mut g in grads {
                let _ = g.g_mul_(&scale);
            }
        }
        total
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bc2 = 1.0 - c.beta2.powi(self.steps as i32);
        tch::no_grad(|| {
            for ((p, m), v) in self
                .params
                .iter_mut()
                .zip(&mut self.exp_avg)
                .zip(&mut self.exp_avg_sq)
            {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = m.lerp_(&g, 1.0 - c.beta1);
                let _ = v.g_mul_scalar_(c.beta2);
                let _ = v.addcmul_(&g, &(&g * (1.0 - c.beta2)));
                if c.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let denom = (v.sqrt() / bc2.sqrt()).g_add_scalar_(c.eps);
                let _ = p.addcdiv_(&(m.shallow_clone() * (-lr / bc1)), &denom);
            }
        });
    }

    /// Total elements of optimizer state (for memory accounting).
    pub fn state_numel(&self) -> i64 {
        self.exp_avg
            .iter()
            .chain(&self.exp_avg_sq)
            .map(|t| t.numel() as i64)
            .sum()
    }

    /// Parameter dtype, for reporting.
    pub fn kind(&self) -> Kind {
        self.params.first().map(|p| p.kind()).unwrap_or(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_floor() {
        let c = OptimConfig {
            lr: 1.0,
            warmup: 10,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((c.lr_at(0, 100) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9, 100) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(100, 100) - 0.1).abs() < 1e-12);
        assert!(c.lr_at(50, 100) < 1.0 && c.lr_at(50, 100) > 0.1);
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        let x = Tensor::from_slice(&[3.0f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![x.shallow_clone()],
            OptimConfig {
                grad_clip: 0.0,
                ..Default::default()
            },
        );
        for _ in 0..500 {
            opt.zero_grad();
            (&x * &x).sum(Kind::Float).backward();
            opt.step(0.05);
        }
        assert!(x.abs().max().double_value(&[]) < 0.05, "{x}");
    }
}
