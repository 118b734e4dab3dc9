//! The pieces of a layer: norm, rotary positions, attention, MLP, and the pre-norm layer.
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::config::ModelConfig;

pub(super) const INIT_STD: f64 = 0.02;
const NORM_EPS: f64 = 1e-6;
const ROPE_BASE: f64 = 10_000.0;

pub(super) fn linear(p: nn::Path, inp: i64, out: i64, std: f64) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        },
        bs_init: None,
        bias: false,
    };
    nn::linear(p, inp, out, cfg)
}

/// RMSNorm with a learned gain (libtorch's fused `rms_norm`).
#[derive(Debug)]
pub struct RmsNorm {
    pub(super) weight: Tensor,
    dim: i64,
}

impl RmsNorm {
    pub(super) fn new(p: nn::Path, dim: i64) -> Self {
        RmsNorm {
            weight: p.ones("weight", &[dim]),
            dim,
        }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.rms_norm([self.dim], Some(&self.weight), NORM_EPS)
    }
}

/// Rotary position tables (GPT-NeoX half-split form), kept in f32 so angles stay exact;
/// each forward takes a slice cast to the activations' dtype.
#[derive(Debug)]
pub struct Rope {
    pub(super) cos: Tensor, // (T, D/2)
    pub(super) sin: Tensor, // (T, D/2)
}

impl Rope {
    /// Tables for positions `0..len` and heads of width `head_dim`.
    pub fn new(len: i64, head_dim: i64, device: tch::Device) -> Self {
        let half = head_dim / 2;
        let inv_freq = Tensor::arange(half, (Kind::Float, device))
            .f_mul_scalar(-2.0 * ROPE_BASE.ln() / head_dim as f64)
            .unwrap()
            .exp(); // (D/2)
        let pos = Tensor::arange(len, (Kind::Float, device)); // (T)
        let angles = pos.unsqueeze(1) * inv_freq.unsqueeze(0); // (T, D/2)
        Rope {
            cos: angles.cos(),
            sin: angles.sin(),
        }
    }

    pub(super) fn len(&self) -> i64 {
        self.cos.size()[0]
    }

    /// Positions `start..start + len` in `kind`, so rotation never promotes bf16/f16
    /// activations to f32.
    pub(super) fn view(&self, start: i64, len: i64, kind: Kind) -> Rope {
        Rope {
            cos: self.cos.narrow(0, start, len).to_kind(kind),
            sin: self.sin.narrow(0, start, len).to_kind(kind),
        }
    }

    /// Rotates `x` of shape (N, H, T, D); the table holds exactly T positions.
    fn apply(&self, x: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let x1 = x.narrow(-1, 0, half);
        let x2 = x.narrow(-1, half, half);
        Tensor::cat(
            &[
                &x1 * &self.cos - &x2 * &self.sin,
                &x2 * &self.cos + &x1 * &self.sin,
            ],
            -1,
        )
    }
}

/// How new positions attend.
pub(super) enum AttnMask<'a> {
    /// Every position sees every position (bidirectional), or a lone new token sees
    /// its whole cache.
    None,
    /// Causal with queries and keys starting at the same position (SDPA's `is_causal`).
    Causal,
    /// Explicit (T_new, T_total) boolean mask: new tokens after a non-empty cache.
    Explicit(&'a Tensor),
}

/// Multi-head self-attention through libtorch's scaled-dot-product kernel.
#[derive(Debug)]
pub struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    n_heads: i64,
}

impl Attention {
    fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        let d = cfg.d_model;
        let proj_std = INIT_STD / (2.0 * cfg.n_layers as f64).sqrt();
        Attention {
            qkv: linear(&p / "qkv", d, 3 * d, INIT_STD),
            proj: linear(&p / "proj", d, d, proj_std),
            n_heads: cfg.n_heads,
        }
    }

    /// `past`: this layer's cached keys/values, extended in place with the new ones.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        past: Option<&mut Option<(Tensor, Tensor)>>,
        mask: &AttnMask,
    ) -> Tensor {
        let (n, t, d) = x.size3().unwrap();
        let hd = d / self.n_heads;
        let qkv = self
            .qkv
            .forward(x)
            .view([n, t, 3, self.n_heads, hd])
            .permute([2, 0, 3, 1, 4]); // (3, N, H, T, hd)
        let q = rope.apply(&qkv.get(0));
        let mut k = rope.apply(&qkv.get(1));
        let mut v = qkv.get(2);
        if let Some(past) = past {
            if let Some((pk, pv)) = past.as_ref() {
                k = Tensor::cat(&[pk, &k], 2);
                v = Tensor::cat(&[pv, &v], 2);
            }
            *past = Some((k.shallow_clone(), v.shallow_clone()));
        }
        let (explicit, is_causal) = match mask {
            AttnMask::None => (None, false),
            AttnMask::Causal => (None, true),
            AttnMask::Explicit(m) => (Some(m.shallow_clone()), false),
        };
        // (N, H, T, hd)
        let y =
            Tensor::scaled_dot_product_attention(&q, &k, &v, explicit, 0.0, is_causal, None, false);
        let y = y.transpose(1, 2).contiguous().view([n, t, d]); // (N, T, d)
        self.proj.forward(&y)
    }
}

/// Position-wise MLP with GELU.
#[derive(Debug)]
pub struct Mlp {
    fc: nn::Linear,
    proj: nn::Linear,
}

impl Mlp {
    fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        let hidden = cfg.mlp_ratio * cfg.d_model;
        let proj_std = INIT_STD / (2.0 * cfg.n_layers as f64).sqrt();
        Mlp {
            fc: linear(&p / "fc", cfg.d_model, hidden, INIT_STD),
            proj: linear(&p / "proj", hidden, cfg.d_model, proj_std),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.proj.forward(&self.fc.forward(x).gelu("tanh"))
    }
}

/// Pre-norm transformer layer.
#[derive(Debug)]
pub struct Layer {
    norm1: RmsNorm,
    attn: Attention,
    norm2: RmsNorm,
    mlp: Mlp,
}

impl Layer {
    pub(super) fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        Layer {
            norm1: RmsNorm::new(&p / "norm1", cfg.d_model),
            attn: Attention::new(&p / "attn", cfg),
            norm2: RmsNorm::new(&p / "norm2", cfg.d_model),
            mlp: Mlp::new(&p / "mlp", cfg),
        }
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        past: Option<&mut Option<(Tensor, Tensor)>>,
        mask: &AttnMask,
    ) -> Tensor {
        let x = x + self.attn.forward(&self.norm1.forward(x), rope, past, mask);
        &x + self.mlp.forward(&self.norm2.forward(&x))
    }
}
