//! The whole network: input (byte ids or a latent), layers, head, and the KV cache a
//! pipeline stage keeps between steps.
use std::ops::Range;

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::layers::{linear, AttnMask, Layer, RmsNorm, Rope, INIT_STD};
use crate::config::ModelConfig;
use crate::{INPUT_VOCAB, OUTPUT_VOCAB};

/// Fourier features of t fed to the optional t-conditioning projection.
const T_FEATURES: i64 = 16;

/// Keys and values of past positions for the layers one pipeline stage runs.
///
/// A cache belongs to one sequence batch and one layer range: use it with the same
/// `layers` on every call. Clones are cheap (tensors are shared, never written in place).
#[derive(Debug, Default)]
pub struct KvCache {
    /// The layer range this cache serves, fixed by its first use.
    layers: Option<Range<usize>>,
    /// Per layer of the range: keys and values (N, H, positions, hd).
    kv: Vec<Option<(Tensor, Tensor)>>,
    positions: i64,
    /// Rotary table for positions past the network's own (grown by doubling).
    rope: Option<Rope>,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        let kv = self
            .kv
            .iter()
            .map(|e| {
                e.as_ref()
                    .map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))
            })
            .collect();
        KvCache {
            layers: self.layers.clone(),
            kv,
            positions: self.positions,
            rope: self.rope.as_ref().map(|r| Rope {
                cos: r.cos.shallow_clone(),
                sin: r.sin.shallow_clone(),
            }),
        }
    }
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions cached so far.
    pub fn positions(&self) -> i64 {
        self.positions
    }
}

/// What a network reads.
#[derive(Debug)]
enum Input {
    /// Byte ids and MASK through a learned table (masked diffusion, AR).
    Tokens(nn::Embedding),
    /// A noisy latent (N, T, embed_dim) mapped into the residual stream (embedding
    /// diffusion); `out` maps the stream back to the embedding width (EDM's F). `table`
    /// is the run's fixed byte embedding (256, embed_dim): a plain tensor, not a
    /// variable, so no block trains it, checkpoints carry it, or deltas move it.
    Latent {
        inp: nn::Linear,
        out: nn::Linear,
        table: Tensor,
    },
}

/// A byte transformer: 257 input ids (bytes + MASK), or a noisy byte-embedding latent,
/// to logits over 256 bytes.
#[derive(Debug)]
pub struct Denoiser {
    input: Input,
    t_proj: Option<nn::Linear>,
    /// Physical layers; layer application `i` runs `layers[i / tie]`.
    layers: Vec<Layer>,
    /// Consecutive applications that share one physical layer (1: untied).
    tie: usize,
    norm_f: RmsNorm,
    /// Byte logits: from the residual stream (tokens), or from the preconditioned
    /// denoised latent D (latent input), with a bias as a learned byte prior.
    head: nn::Linear,
    rope: Rope,
    cfg: ModelConfig,
}

impl Denoiser {
    /// Builds the network's variables under `p` (its own `VarStore`, one per block).
    pub fn new(p: &nn::Path, cfg: &ModelConfig) -> Self {
        Self::new_tied(p, cfg, 1)
    }

    /// [`Denoiser::new`] with tied layers: `cfg.n_layers` layer applications, each run of
    /// `tie` consecutive applications sharing one physical layer (`ceil(n_layers / tie)`
    /// of them, keys `layers/0..`). Every application still computes (and keeps its own
    /// KV cache entry), so the cost per token is that of `n_layers` layers while the
    /// weights take `1/tie` of the memory: for measuring serving cost at a scale whose
    /// untied weights would not fit. `tie` 0 counts as 1.
    pub fn new_tied(p: &nn::Path, cfg: &ModelConfig, tie: usize) -> Self {
        let tie = tie.max(1);
        let emb_cfg = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: INIT_STD,
            },
            ..Default::default()
        };
        // Variables are drawn from the seeded generator in creation order, so the order
        // fixes every network's initial weights: byte-id networks keep the order of the
        // runs in docs/RESULTS.md (tok_emb, t_proj, layers, norm_f, head); an edm network
        // creates its input, output and head projections first.
        let (input, latent_head) = match &cfg.edm {
            None => (
                Input::Tokens(nn::embedding(
                    p / "tok_emb",
                    INPUT_VOCAB,
                    cfg.d_model,
                    emb_cfg,
                )),
                None,
            ),
            Some(edm) => {
                let e = edm.embed_dim;
                let head_cfg = nn::LinearConfig {
                    ws_init: nn::Init::Randn {
                        mean: 0.0,
                        stdev: INIT_STD,
                    },
                    bs_init: Some(nn::Init::Const(0.0)),
                    bias: true,
                };
                (
                    Input::Latent {
                        inp: linear(p / "in_proj", e, cfg.d_model, INIT_STD),
                        out: linear(p / "out_proj", cfg.d_model, e, INIT_STD),
                        table: crate::objective::edm::byte_table(edm, p.device()),
                    },
                    Some(nn::linear(p / "head", e, OUTPUT_VOCAB, head_cfg)),
                )
            }
        };
        // Embedding diffusion is always conditioned on its noise level.
        let t_proj = (cfg.t_cond || cfg.edm.is_some())
            .then(|| linear(p / "t_proj", 2 * T_FEATURES, cfg.d_model, INIT_STD));
        let physical = (cfg.n_layers as usize).div_ceil(tie);
        let layers = (0..physical)
            .map(|i| Layer::new(p / "layers" / i, cfg))
            .collect();
        let norm_f = RmsNorm::new(p / "norm_f", cfg.d_model);
        let head =
            latent_head.unwrap_or_else(|| linear(p / "head", cfg.d_model, OUTPUT_VOCAB, INIT_STD));
        Denoiser {
            input,
            t_proj,
            layers,
            tie,
            norm_f,
            head,
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
        let mut x = self.embed(tokens); // (N, T, d)
        if let (Some(proj), Some(t)) = (&self.t_proj, t) {
            // (N, 1, d) broadcast over T, in the net's dtype.
            x += proj.forward(&t_features(t).to_kind(x.kind())).unsqueeze(1);
        }
        self.head_logits(&self.forward_layers(0..self.n_layers(), &x))
    }

    /// Token embeddings (N, T) int64 -> (N, T, d) in the network's dtype.
    pub fn embed(&self, tokens: &Tensor) -> Tensor {
        match &self.input {
            Input::Tokens(emb) => emb.forward(tokens),
            Input::Latent { .. } => panic!("an embedding-diffusion network reads latents"),
        }
    }

    /// Embedding diffusion's raw network F: the scaled latent `c_in * z` (N, T, e) and
    /// the noise feature `c_noise` (N) to (N, T, e). The EDM preconditioning around it
    /// lives in `objective::edm`.
    pub fn forward_latent(&self, z_in: &Tensor, c_noise: &Tensor) -> Tensor {
        let Input::Latent { inp, out, .. } = &self.input else {
            panic!("a byte-id network has no latent input");
        };
        let mut x = inp.forward(z_in); // (N, T, d)
        if let Some(proj) = &self.t_proj {
            x += proj
                .forward(&t_features(c_noise).to_kind(x.kind()))
                .unsqueeze(1);
        }
        let h = self.forward_layers(0..self.n_layers(), &x);
        out.forward(&self.norm_f.forward(&h)) // (N, T, e)
    }

    /// Byte logits (N, T, 256) from a denoised latent D (N, T, e).
    pub fn head_from_latent(&self, denoised: &Tensor) -> Tensor {
        self.head.forward(denoised)
    }

    /// Element type of the weights (f32 unless built in a lower precision).
    pub fn param_kind(&self) -> Kind {
        self.norm_f.weight.kind()
    }

    /// The fixed byte embedding of an embedding-diffusion network.
    pub fn byte_table(&self) -> Option<&Tensor> {
        match &self.input {
            Input::Latent { table, .. } => Some(table),
            Input::Tokens(_) => None,
        }
    }

    /// The physical layers that layer applications `range` run, in order.
    fn applied(&self, range: Range<usize>) -> impl Iterator<Item = &Layer> {
        range.map(move |i| &self.layers[i / self.tie])
    }

    /// Runs layers `layers` on `x` (N, T, d) without a cache: the network's own attention
    /// (causal or bidirectional) over positions `0..T`.
    pub fn forward_layers(&self, layers: Range<usize>, x: &Tensor) -> Tensor {
        let len = x.size()[1];
        let rope = if len <= self.rope.len() {
            self.rope.view(0, len, x.kind())
        } else {
            Rope::new(len, self.cfg.head_dim(), x.device()).view(0, len, x.kind())
        };
        let mask = if self.cfg.causal {
            AttnMask::Causal
        } else {
            AttnMask::None
        };
        assert!(
            layers.end <= self.n_layers(),
            "layer range {layers:?} out of bounds"
        );
        let mut x = x.shallow_clone();
        for layer in self.applied(layers) {
            x = layer.forward(&x, &rope, None, &mask);
        }
        x
    }

    /// Runs layers `layers` (indices into this network's layers) on `x` (N, T_new, d),
    /// which holds the positions after those already in `cache`; causal attention over
    /// cached + new positions; appends the new keys/values. Only for causal networks.
    pub fn forward_layers_cached(
        &self,
        layers: Range<usize>,
        x: &Tensor,
        cache: &mut KvCache,
    ) -> Tensor {
        assert!(self.cfg.causal, "a KV cache needs a causal network");
        assert!(
            layers.end <= self.n_layers(),
            "layer range {layers:?} out of bounds"
        );
        match &cache.layers {
            None => {
                cache.layers = Some(layers.clone());
                cache.kv = (0..layers.len()).map(|_| None).collect();
            }
            Some(r) => assert_eq!(*r, layers, "a KV cache serves one layer range"),
        }
        let t_new = x.size()[1];
        let offset = cache.positions;
        let end = offset + t_new;
        let rope = if end <= self.rope.len() {
            self.rope.view(offset, t_new, x.kind())
        } else {
            if cache.rope.as_ref().is_none_or(|r| r.len() < end) {
                let len = end.max(
                    2 * self
                        .rope
                        .len()
                        .max(cache.rope.as_ref().map_or(0, Rope::len)),
                );
                cache.rope = Some(Rope::new(len, self.cfg.head_dim(), x.device()));
            }
            cache.rope.as_ref().unwrap().view(offset, t_new, x.kind())
        };
        // SDPA's is_causal aligns top-left: right only when queries start at key 0.
        let explicit;
        let mask = if t_new == 1 {
            AttnMask::None
        } else if offset == 0 {
            AttnMask::Causal
        } else {
            let keys = Tensor::arange(end, (Kind::Int64, x.device())).unsqueeze(0);
            let queries = Tensor::arange_start(offset, end, (Kind::Int64, x.device())).unsqueeze(1);
            explicit = keys.le_tensor(&queries); // (T_new, T_total)
            AttnMask::Explicit(&explicit)
        };
        let mut x = x.shallow_clone();
        for (layer, past) in self.applied(layers).zip(cache.kv.iter_mut()) {
            x = layer.forward(&x, &rope, Some(past), &mask);
        }
        cache.positions = end;
        x
    }

    /// Final norm + head: (N, T, d) -> logits (N, T, 256).
    pub fn head_logits(&self, x: &Tensor) -> Tensor {
        self.head.forward(&self.norm_f.forward(x))
    }

    /// Number of layer applications (the network's depth; tied ones counted each time).
    pub fn n_layers(&self) -> usize {
        self.cfg.n_layers as usize
    }

    /// Number of physical layers (distinct weights): `n_layers()` unless tied.
    pub fn physical_layers(&self) -> usize {
        self.layers.len()
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
