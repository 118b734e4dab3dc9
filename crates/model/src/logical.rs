//! Logical large shapes: randomly initialised networks of a chosen size and precision,
//! for measuring serving cost at scale without trained weights.
//!
//! On CPU, bf16 is the fast low precision. Measured on the 2-core AVX512-BF16 dev host
//! (libtorch 2.13, one layer, T = 256, d 2048): a denoising step ran at ~380 GFLOP/s in
//! bf16, ~130 in f32 and ~40 in f16; f16 linear layers take a slow path (and a plain
//! non-transposed f16 matmul a reference kernel at ~0.6 GFLOP/s). f16 works (finite,
//! stays f16) but belongs on GPUs.
use std::fmt;
use std::str::FromStr;

use tch::{nn, Device, Kind};

use crate::config::ModelConfig;
use crate::transformer::Denoiser;
use crate::{ModelError, INPUT_VOCAB, OUTPUT_VOCAB};

/// Element type of a network's weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl Precision {
    /// The libtorch element kind.
    pub fn kind(self) -> Kind {
        match self {
            Precision::F32 => Kind::Float,
            Precision::F16 => Kind::Half,
            Precision::Bf16 => Kind::BFloat16,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> i64 {
        match self {
            Precision::F32 => 4,
            Precision::F16 | Precision::Bf16 => 2,
        }
    }
}

impl FromStr for Precision {
    type Err = ModelError;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            "bf16" => Ok(Precision::Bf16),
            other => Err(ModelError::Config(format!(
                "unknown dtype '{other}' (use f32, f16 or bf16)"
            ))),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        })
    }
}

/// A transformer shape with a precision, written `d=8192,layers=32,heads=64,dtype=f16`
/// (optional `mlp=4`, `window=1024`, `embed=E`: an embedding-diffusion network
/// reading an E-wide latent, with the default EDM settings otherwise, and `tie=K`).
///
/// **Tied layers** (`tie=K`): every run of K consecutive layer applications shares one
/// physical layer, so `layers=32,tie=32` is one layer's weights applied 32 times. The
/// compute per token is that of `layers` layers (each application really runs and has its
/// own KV cache entry); the weights take `ceil(layers / K)` layers of memory. This is how
/// a shape too large for the machine is served at its full per-token cost: weights are
/// random anyway, and serving cost does not depend on their values (though a layer
/// re-read from memory K times is the same traffic as K distinct layers only once the
/// layer is far larger than the caches, as it is at d = 8192: 1.6 GB in bf16).
#[derive(Clone, Debug, PartialEq)]
pub struct LogicalShape {
    /// Width of the residual stream.
    pub d_model: i64,
    /// Transformer layers.
    pub n_layers: i64,
    /// Attention heads.
    pub n_heads: i64,
    /// MLP hidden width as a multiple of `d_model`.
    pub mlp_ratio: i64,
    /// Element type.
    pub precision: Precision,
    /// Rotary table length (longer sequences still work).
    pub window: i64,
    /// Embedding diffusion: the latent's width (None: byte-id input).
    pub embed: Option<i64>,
    /// Consecutive layer applications sharing one physical layer (1: untied).
    pub tie: i64,
}

/// The keys a shape string may use.
const KEYS: &str = "d, layers, heads, dtype, mlp, window, embed, tie";

/// Largest `tie=`: far more applications of one layer than any shape here needs.
const MAX_TIE: i64 = 1 << 16;

impl FromStr for LogicalShape {
    type Err = ModelError;
    fn from_str(s: &str) -> crate::Result<Self> {
        let bad = |m: String| ModelError::Config(format!("logical shape '{s}': {m}"));
        let (mut d, mut layers, mut heads, mut precision) = (None, None, None, None);
        let (mut mlp, mut window, mut embed, mut tie) = (None, None, None, None);
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("'{item}' is not key=value")))?;
            let (key, value) = (key.trim(), value.trim());
            let int = |slot: &mut Option<i64>| -> crate::Result<()> {
                if slot.is_some() {
                    return Err(bad(format!("`{key}` given twice")));
                }
                let v = value
                    .parse::<i64>()
                    .map_err(|e| bad(format!("bad value for `{key}`: '{value}' ({e})")))?;
                *slot = Some(v);
                Ok(())
            };
            match key {
                "d" => int(&mut d)?,
                "layers" => int(&mut layers)?,
                "heads" => int(&mut heads)?,
                "mlp" => int(&mut mlp)?,
                "window" => int(&mut window)?,
                "embed" => int(&mut embed)?,
                "tie" => int(&mut tie)?,
                "dtype" => {
                    if precision.is_some() {
                        return Err(bad("`dtype` given twice".into()));
                    }
                    precision = Some(value.parse::<Precision>().map_err(|e| bad(e.to_string()))?);
                }
                other => return Err(bad(format!("unknown key `{other}` (use {KEYS})"))),
            }
        }
        let need = |v: Option<i64>, key: &str| v.ok_or_else(|| bad(format!("missing `{key}`")));
        let shape = LogicalShape {
            d_model: need(d, "d")?,
            n_layers: need(layers, "layers")?,
            n_heads: need(heads, "heads")?,
            mlp_ratio: mlp.unwrap_or(4),
            precision: precision.ok_or_else(|| bad("missing `dtype`".into()))?,
            window: window.unwrap_or(1024),
            embed,
            tie: tie.unwrap_or(1),
        };
        if !(1..=MAX_TIE).contains(&shape.tie) {
            return Err(bad(format!(
                "`tie` must be 1..={MAX_TIE} (layer applications per physical layer)"
            )));
        }
        shape
            .model_config()
            .validate()
            .map_err(|e| bad(e.to_string()))?;
        Ok(shape)
    }
}

impl fmt::Display for LogicalShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "d={},layers={},heads={},mlp={},dtype={},window={}",
            self.d_model, self.n_layers, self.n_heads, self.mlp_ratio, self.precision, self.window
        )?;
        if let Some(e) = self.embed {
            write!(f, ",embed={e}")?;
        }
        // Untied shapes print as before, so their model ids do not change.
        if self.tie != 1 {
            write!(f, ",tie={}", self.tie)?;
        }
        Ok(())
    }
}

impl LogicalShape {
    /// Parameters of one layer: qkv (3d²), attention proj (d²), MLP fc and proj
    /// (2·mlp·d²), two RMSNorm gains (2d).
    pub fn params_per_layer(&self) -> i64 {
        let d = self.d_model;
        4 * d * d + 2 * self.mlp_ratio * d * d + 2 * d
    }

    /// Physical layers (distinct weights): `ceil(n_layers / tie)`.
    pub fn physical_layers(&self) -> i64 {
        (self.n_layers + self.tie.max(1) - 1) / self.tie.max(1)
    }

    /// Whole network as stored: physical layers, input embeddings (257 x d), head
    /// (d x 256), final norm. Untied, the same as [`LogicalShape::logical_params`].
    pub fn params(&self) -> i64 {
        let d = self.d_model;
        self.physical_layers() * self.params_per_layer() + INPUT_VOCAB * d + d * OUTPUT_VOCAB + d
    }

    /// Parameters the network would have untied: what its compute per token corresponds to.
    pub fn logical_params(&self) -> i64 {
        LogicalShape {
            tie: 1,
            ..self.clone()
        }
        .params()
    }

    /// Weight bytes in this precision.
    pub fn bytes(&self) -> i64 {
        self.params() * self.precision.size()
    }

    /// The network shape (bidirectional, no t-conditioning).
    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            d_model: self.d_model,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            mlp_ratio: self.mlp_ratio,
            window: self.window,
            causal: false,
            t_cond: false,
            edm: self.embed.map(|embed_dim| crate::config::EdmConfig {
                embed_dim,
                ..Default::default()
            }),
        }
    }

    /// Builds the network with random weights (seeded) in the requested precision;
    /// returns its VarStore and Denoiser. Weights are created directly in that precision
    /// (no f32 copy) and frozen. Seeds libtorch's global generator, like `Trainer::new`.
    pub fn build(&self, device: Device, seed: i64, causal: bool) -> (nn::VarStore, Denoiser) {
        let mut cfg = self.model_config();
        cfg.causal = causal;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(self.precision.kind()); // empty store: sets the kind new variables get
        tch::manual_seed(seed);
        let net = Denoiser::new_tied(&vs.root(), &cfg, self.tie.max(1) as usize);
        vs.freeze();
        (vs, net)
    }

    /// Smallest number of layers (same d/heads/mlp, untied) whose params reach `target`.
    pub fn layers_for(&self, target_params: f64) -> i64 {
        let fixed = LogicalShape {
            n_layers: 0,
            tie: 1,
            ..self.clone()
        }
        .params() as f64;
        (((target_params - fixed) / self.params_per_layer() as f64).ceil() as i64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    fn small(precision: Precision) -> LogicalShape {
        LogicalShape {
            d_model: 32,
            n_layers: 2,
            n_heads: 2,
            mlp_ratio: 3,
            precision,
            window: 16,
            embed: None,
            tie: 1,
        }
    }

    #[test]
    fn params_match_the_built_network() {
        for p in [Precision::F32, Precision::Bf16] {
            let shape = small(p);
            let (vs, _) = shape.build(Device::Cpu, 0, false);
            let real: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
            assert_eq!(shape.params(), real);
            assert!(vs.variables().values().all(|t| t.kind() == p.kind()));
            assert_eq!(shape.bytes(), real * p.size());
        }
        let shape = small(Precision::F32);
        let l = shape.layers_for(shape.params() as f64 + 1.0);
        assert_eq!(l, 3);
        assert_eq!(shape.layers_for(shape.params() as f64), 2);
    }

    #[test]
    fn tied_layers_apply_one_layer_l_times() {
        let tied = LogicalShape {
            n_layers: 3,
            tie: 3,
            ..small(Precision::F32)
        };
        let one = LogicalShape {
            n_layers: 1,
            ..tied.clone()
        };
        let (vs, net) = tied.build(Device::Cpu, 4, false);
        let real: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(
            (tied.params(), one.params()),
            (real, real),
            "stores one layer"
        );
        assert_eq!(tied.logical_params() - real, 2 * tied.params_per_layer());
        assert_eq!((net.n_layers(), net.physical_layers()), (3, 1));
        let tokens = Tensor::from_slice(&[1i64, 2, 3, 256, 5, 6]).view([1, 6]);
        let x = tch::no_grad(|| net.embed(&tokens));
        let all = tch::no_grad(|| net.forward_layers(0..3, &x));
        let mut by_hand = x.shallow_clone();
        for _ in 0..3 {
            by_hand = tch::no_grad(|| net.forward_layers(0..1, &by_hand));
        }
        assert!(all.allclose(&by_hand, 1e-5, 1e-5, false), "3 applications");
        let once = tch::no_grad(|| net.forward_layers(0..1, &x));
        let moved = f64::try_from((&all - &once).abs().max()).unwrap();
        assert!(moved > 1e-3, "the tied stack ran only once ({moved})");

        // Causal and cached: each application keeps its own keys and values.
        let (_vs, causal) = tied.build(Device::Cpu, 4, true);
        let full = tch::no_grad(|| causal.forward(&tokens, None));
        let mut cache = crate::transformer::KvCache::new();
        let h: Vec<Tensor> = tch::no_grad(|| {
            [
                tokens.narrow(1, 0, 4),
                tokens.narrow(1, 4, 1),
                tokens.narrow(1, 5, 1),
            ]
            .iter()
            .map(|c| causal.forward_layers_cached(0..3, &causal.embed(c), &mut cache))
            .collect()
        });
        let cached = causal.head_logits(&Tensor::cat(&h, 1));
        assert!(
            cached.allclose(&full, 1e-4, 1e-4, false),
            "tied cached != full"
        );
    }

    #[test]
    fn parses_displays_and_names_bad_keys() {
        let s: LogicalShape = "d=8192,layers=32,heads=64,dtype=f16".parse().unwrap();
        assert_eq!(
            (s.mlp_ratio, s.window, s.precision),
            (4, 1024, Precision::F16)
        );
        assert_eq!(s.to_string().parse::<LogicalShape>().unwrap(), s);
        let err = |t: &str| t.parse::<LogicalShape>().unwrap_err().to_string();
        assert!(err("d=64,layers=2,heads=2,dtype=f8").contains("f8"));
        assert!(err("d=64,layers=x,heads=2,dtype=f32").contains("`layers`"));
        assert!(err("d=64,layers=2,heads=2,dtype=f32,depth=3").contains("`depth`"));
        assert!(err("d=64,layers=2,dtype=f32").contains("`heads`"));
        assert!(err("d=64,layers=2,heads=3,dtype=f32").contains("heads"));
        assert!(err("d=64,d=64,layers=2,heads=2,dtype=f32").contains("twice"));
        assert!(err("d=64,layers=2,heads=2,dtype=f32,tie=0").contains("`tie`"));
        let t: LogicalShape = "d=64,layers=95,heads=2,dtype=bf16,tie=32".parse().unwrap();
        assert_eq!((t.tie, t.physical_layers()), (32, 3));
        assert_eq!(t.to_string().parse::<LogicalShape>().unwrap(), t);
        assert!(
            !s.to_string().contains("tie"),
            "untied shapes print as before"
        );
    }

    #[test]
    fn low_precision_forward_stays_in_its_dtype_and_is_finite() {
        let tokens = Tensor::from_slice(&[1i64, 2, 3, 256, 5, 6]).view([1, 6]);
        for p in [Precision::F16, Precision::Bf16] {
            for causal in [false, true] {
                let (_vs, net) = small(p).build(Device::Cpu, 1, causal);
                let logits = tch::no_grad(|| net.forward(&tokens, None));
                assert_eq!(logits.kind(), p.kind(), "{p} promoted");
                let finite = logits.to_kind(Kind::Float).isfinite().all();
                assert!(bool::try_from(finite).unwrap(), "{p}: non-finite logits");
                if causal {
                    // The cached path (prefill, then a chunk under an explicit mask) too.
                    let mut cache = crate::transformer::KvCache::new();
                    let chunks = [tokens.narrow(1, 0, 3), tokens.narrow(1, 3, 3)];
                    let h: Vec<Tensor> = tch::no_grad(|| {
                        chunks
                            .iter()
                            .map(|c| net.forward_layers_cached(0..2, &net.embed(c), &mut cache))
                            .collect()
                    });
                    let cached = net.head_logits(&Tensor::cat(&h, 1));
                    assert_eq!(cached.kind(), p.kind());
                    let (a, b) = (cached.to_kind(Kind::Float), logits.to_kind(Kind::Float));
                    assert!(a.allclose(&b, 0.05, 0.02, false), "{p}: cached != full");
                }
            }
        }
    }
}
