//! One block's network: a pre-norm byte transformer with rotary positions.
//!
//! The same code builds the bidirectional denoiser of a block, the end-to-end (E2E)
//! reference, and (with `causal`) the autoregressive reference. Variable names under
//! the `nn::Path` are checkpoint keys: keep them stable.
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::config::ModelConfig;
use crate::{INPUT_VOCAB, OUTPUT_VOCAB};

const INIT_STD: f64 = 0.02;
const NORM_EPS: f64 = 1e-6;
const ROPE_BASE: f64 = 10_000.0;
/// Fourier features of t fed to the optional t-conditioning projection.
const T_FEATURES: i64 = 16;

fn linear(p: nn::Path, inp: i64, out: i64, std: f64) -> nn::Linear {
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
    weight: Tensor,
    dim: i64,
}

impl RmsNorm {
    fn new(p: nn::Path, dim: i64) -> Self {
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

/// Rotary position tables (GPT-NeoX half-split form), built once per length and device.
#[derive(Debug)]
pub struct Rope {
    cos: Tensor, // (T, D/2)
    sin: Tensor, // (T, D/2)
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

    fn len(&self) -> i64 {
        self.cos.size()[0]
    }

    /// Rotates `x` of shape (N, H, T, D) by position.
    fn apply(&self, x: &Tensor) -> Tensor {
        let t = x.size()[2];
        let half = x.size()[3] / 2;
        let cos = self.cos.narrow(0, 0, t); // (T, D/2)
        let sin = self.sin.narrow(0, 0, t);
        let x1 = x.narrow(-1, 0, half);
        let x2 = x.narrow(-1, half, half);
        Tensor::cat(&[&x1 * &cos - &x2 * &sin, &x2 * &cos + &x1 * &sin], -1)
    }
}

/// Multi-head self-attention through libtorch's scaled-dot-product kernel.
#[derive(Debug)]
pub struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    n_heads: i64,
    causal: bool,
}

impl Attention {
    fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        let d = cfg.d_model;
        let proj_std = INIT_STD / (2.0 * cfg.n_layers as f64).sqrt();
        Attention {
            qkv: linear(&p / "qkv", d, 3 * d, INIT_STD),
            proj: linear(&p / "proj", d, d, proj_std),
            n_heads: cfg.n_heads,
            causal: cfg.causal,
        }
    }

    fn forward(&self, x: &Tensor, rope: &Rope) -> Tensor {
        let (n, t, d) = x.size3().unwrap();
        let hd = d / self.n_heads;
        let qkv = self
            .qkv
            .forward(x)
            .view([n, t, 3, self.n_heads, hd])
            .permute([2, 0, 3, 1, 4]); // (3, N, H, T, hd)
        let q = rope.apply(&qkv.get(0));
        let k = rope.apply(&qkv.get(1));
        let v = qkv.get(2);
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            self.causal,
            None,
            false,
        ); // (N, H, T, hd)
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
    fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        Layer {
            norm1: RmsNorm::new(&p / "norm1", cfg.d_model),
            attn: Attention::new(&p / "attn", cfg),
            norm2: RmsNorm::new(&p / "norm2", cfg.d_model),
            mlp: Mlp::new(&p / "mlp", cfg),
        }
    }

    fn forward(&self, x: &Tensor, rope: &Rope) -> Tensor {
        let x = x + self.attn.forward(&self.norm1.forward(x), rope);
        &x + self.mlp.forward(&self.norm2.forward(&x))
    }
}

/// A byte transformer: 257 input ids (bytes + MASK) to logits over 256 bytes.
#[derive(Debug)]
pub struct Denoiser {
    tok_emb: nn::Embedding,
    t_proj: Option<nn::Linear>,
    layers: Vec<Layer>,
    norm_f: RmsNorm,
    head: nn::Linear,
    rope: Rope,
    cfg: ModelConfig,
}

impl Denoiser {
    /// Builds the network's variables under `p` (its own `VarStore`, one per block).
    pub fn new(p: &nn::Path, cfg: &ModelConfig) -> Self {
        let emb_cfg = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: INIT_STD,
            },
            ..Default::default()
        };
        Denoiser {
            tok_emb: nn::embedding(p / "tok_emb", INPUT_VOCAB, cfg.d_model, emb_cfg),
            t_proj: cfg
                .t_cond
                .then(|| linear(p / "t_proj", 2 * T_FEATURES, cfg.d_model, INIT_STD)),
            layers: (0..cfg.n_layers)
                .map(|i| Layer::new(p / "layers" / i, cfg))
                .collect(),
            norm_f: RmsNorm::new(p / "norm_f", cfg.d_model),
            head: linear(p / "head", cfg.d_model, OUTPUT_VOCAB, INIT_STD),
            rope: Rope::new(cfg.window, cfg.head_dim(), p.device()),
            cfg: cfg.clone(),
        }
    }

    /// The shape this network was built with.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// `tokens` (N, T) int64 ids, `t` (N) masking levels (used only with `t_cond`);
    /// returns logits (N, T, 256). Sequences longer than the training window get
    /// fresh rotary tables (extrapolation: quality may drop).
    pub fn forward(&self, tokens: &Tensor, t: Option<&Tensor>) -> Tensor {
        let len = tokens.size()[1];
        let long_rope;
        let rope = if len <= self.rope.len() {
            &self.rope
        } else {
            long_rope = Rope::new(len, self.cfg.head_dim(), tokens.device());
            &long_rope
        };
        let mut x = self.tok_emb.forward(tokens); // (N, T, d)
        if let (Some(proj), Some(t)) = (&self.t_proj, t) {
            x += proj.forward(&t_features(t)).unsqueeze(1); // (N, 1, d) broadcast over T
        }
        for layer in &self.layers {
            x = layer.forward(&x, rope);
        }
        self.head.forward(&self.norm_f.forward(&x))
    }
}

/// Sinusoidal features of t: (N) -> (N, 2 * T_FEATURES).
fn t_features(t: &Tensor) -> Tensor {
    let freqs = Tensor::arange(T_FEATURES, (Kind::Float, t.device()))
        .f_add_scalar(1.0)
        .unwrap()
        * std::f64::consts::PI;
    let angles = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0); // (N, F)
    Tensor::cat(&[angles.sin(), angles.cos()], 1)
}
