//! The embedding family (the paper's objective): the bound's block decomposition, the
//! bound's estimator against an exact answer, isolation of blocks, and the sampler.
use blocktrain_model::config::{EdmConfig, ModelConfig, Schedule};
use blocktrain_model::eval::{self, EvalSettings};
use blocktrain_model::objective::edm::{
    self, diffusion_share_with, prior_kl, reconstruction, BlockTerms, LatentNet,
};
use blocktrain_model::objective::{stratified_unit, Draw};
use blocktrain_model::optim::OptimConfig;
use blocktrain_model::sampler::{edm as edm_sampler, SampleRng, SampleSettings};
use blocktrain_model::trainer::{Objective, Trainer};
use blocktrain_model::transformer::Denoiser;
use tch::{nn, Device, Kind, Tensor};

fn edm_cfg() -> EdmConfig {
    EdmConfig {
        embed_dim: 16,
        ..EdmConfig::default()
    }
}

fn tiny(edm: EdmConfig) -> ModelConfig {
    ModelConfig {
        d_model: 32,
        edm: Some(edm),
        ..ModelConfig::tiny_block()
    }
}

fn bytes(n: i64, len: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randint(256, [n, len], (Kind::Int64, Device::Cpu))
}

/// `exp(ln lo + (ln hi - ln lo) (i + u) / n)`: stratified in ln sigma with offset u.
fn log_strata(n: i64, lo: f64, hi: f64, u: &Tensor) -> Tensor {
    (stratified_unit(n, u) * (hi / lo).ln() + lo.ln()).exp()
}

/// On one fixed batch with shared noise, the blocks' shares (diffusion slices, block 1's
/// reconstruction, block B's prior) add up exactly to the whole bound's estimate.
#[test]
fn bound_shares_sum_exactly_to_the_whole_bound_on_a_fixed_batch() {
    let cfg = edm_cfg();
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Denoiser::new(&vs.root(), &tiny(cfg.clone()));
    // Sigma boundaries 10^0, 10^0.2, 10^0.5, 10^1: log widths in the ratio 2 : 3 : 5, so
    // 4, 6 and 10 rows per block align with 20 global strata.
    let sigmas = [1.0, 10f64.powf(0.2), 10f64.powf(0.5), 10.0];
    let schedule =
        Schedule::from_boundaries(sigmas.iter().map(|&s| cfg.mass_of(s)).collect()).unwrap();
    let back = cfg.sigma_bounds(&schedule);
    for (a, b) in back.iter().zip(sigmas) {
        assert!((a - b).abs() < 1e-9, "{back:?}");
    }
    let rows = [4i64, 6, 10];
    let n: i64 = rows.iter().sum();
    let x = bytes(n, 16, 11);
    let eps = edm::draw_eps(&x, cfg.embed_dim);
    let eps_recon = edm::draw_eps(&x, cfg.embed_dim);
    let u = Tensor::from_slice(&[0.37f32]);
    tch::no_grad(|| {
        let whole_width = (cfg.sigma_max / cfg.sigma_min).ln();
        let sigma = log_strata(n, cfg.sigma_min, cfg.sigma_max, &u);
        let whole = diffusion_share_with(&net, &x, &sigma, &eps, whole_width).mean(Kind::Double)
            + reconstruction(&net, &x, cfg.sigma_min, &eps_recon).mean(Kind::Double)
            + prior_kl(net.table(), &cfg, &x).mean(Kind::Double);
        let mut sum = 0.0;
        let mut start = 0;
        for (b, &m) in rows.iter().enumerate() {
            let terms = BlockTerms::of(&back, b);
            let xb = x.narrow(0, start, m);
            let s = log_strata(m, terms.lo, terms.hi, &u);
            let w = (terms.hi / terms.lo).ln();
            sum += diffusion_share_with(&net, &xb, &s, &eps.narrow(0, start, m), w)
                .mean(Kind::Double)
                .double_value(&[]);
            if terms.reconstruction {
                sum += reconstruction(&net, &x, cfg.sigma_min, &eps_recon)
                    .mean(Kind::Double)
                    .double_value(&[]);
            }
            if terms.prior {
                sum += prior_kl(net.table(), &cfg, &x)
                    .mean(Kind::Double)
                    .double_value(&[]);
            }
            start += m;
        }
        let whole = whole.double_value(&[]);
        assert!(
            (sum - whole).abs() < 1e-4 * whole,
            "blocks {sum} vs whole {whole}"
        );
    });
}

/// The exact posterior of a byte drawn uniformly from 256, seen through
/// `z = e(x) + sigma * eps` position by position: softmax of `-|z - e_v|^2 / (2 sigma^2)`.
struct BayesDenoiser {
    table: Tensor,
}

impl LatentNet for BayesDenoiser {
    fn table(&self) -> &Tensor {
        &self.table
    }

    fn latent_logits(&self, z: &Tensor, sigma: &Tensor) -> Tensor {
        let s2 = sigma.square().view([-1, 1, 1]);
        let sq = self.table.square().sum_dim_intlist(-1, false, Kind::Float); // (256)
        (z.matmul(&self.table.tr()) - sq * 0.5) / s2 // (N, T, 256), |z|^2 dropped
    }
}

/// Against an exact answer: for uniformly random bytes and the Bayes-optimal denoiser,
/// the I-MMSE identity makes the expected bound equal to ln 256 plus the KL of the
/// latent's marginal at sigma_max from the prior, which lies between 0 and the prior
/// term. A wrong weight on the integral, a wrong sigma draw, or a missing reconstruction
/// or prior term breaks this; a quadrature over sigma checks the diffusion estimator.
#[test]
fn bound_estimator_matches_the_entropy_of_uniform_bytes_under_the_exact_denoiser() {
    let cfg = EdmConfig {
        embed_dim: 8,
        sigma_min: 0.3,
        sigma_max: 2.5,
        ..EdmConfig::default()
    };
    let net = BayesDenoiser {
        table: edm::byte_table(&cfg, Device::Cpu),
    };
    let (reps, rows, len) = (96i64, 64i64, 16i64);
    let n = reps * rows;
    let x = bytes(n, len, 21);
    tch::manual_seed(22);
    let terms = BlockTerms::of(&[cfg.sigma_min, cfg.sigma_max], 0);
    // Each repetition is one stratified draw of `rows` levels: the repetitions are
    // independent, so their spread gives an honest standard error.
    let per_rep = |t: &Tensor| t.view([reps, rows]).mean_dim(1, false, Kind::Double);
    let (diffusion, recon, prior) = tch::no_grad(|| {
        let d: Vec<Tensor> = (0..reps)
            .map(|r| {
                let xr = x.narrow(0, r * rows, rows);
                edm::diffusion_share(&net, &xr, cfg.sigma_min, cfg.sigma_max, Draw::Stratified)
            })
            .collect();
        let r = reconstruction(&net, &x, cfg.sigma_min, &edm::draw_eps(&x, cfg.embed_dim));
        (
            per_rep(&Tensor::cat(&d, 0)),
            per_rep(&r),
            per_rep(&prior_kl(net.table(), &cfg, &x)),
        )
    });
    let total = &diffusion + &recon + &prior;
    let stats = |t: &Tensor| {
        let m = t.mean(Kind::Double).double_value(&[]);
        (
            m,
            t.std(true).double_value(&[]) / (t.size()[0] as f64).sqrt(),
        )
    };
    let (bound, se) = stats(&total);
    let (r, r_se) = stats(&recon);
    let (p, _) = stats(&prior);
    let ln256 = 256f64.ln();
    // Both end terms are far from negligible here, so leaving one out would fail below.
    assert!(r > 0.1 && r > 20.0 * r_se, "reconstruction {r} ± {r_se}");
    assert!(p > 4.0 * se, "prior {p} against a standard error of {se}");
    assert!(
        bound > ln256 - 4.0 * se && bound < ln256 + p + 4.0 * se,
        "bound {bound} ± {se}, expected within [ln 256, ln 256 + {p}] = [{ln256}, {}]",
        ln256 + p
    );
    // The same row estimator of the block's whole share agrees.
    let share = tch::no_grad(|| edm::block_share(&net, &cfg, terms, &x, Draw::Independent));
    let (s, s_se) = stats(&per_rep(&share));
    assert!(
        (s - bound).abs() < 4.0 * (se * se + s_se * s_se).sqrt(),
        "{s} vs {bound}"
    );
    // Midpoint quadrature over ln sigma, fresh noise at every node: the diffusion term.
    let nodes = 64;
    let (a, b) = (cfg.sigma_min.ln(), cfg.sigma_max.ln());
    let h = (b - a) / nodes as f64;
    let quad: f64 = tch::no_grad(|| {
        (0..nodes)
            .map(|k| {
                let sigma = (a + (k as f64 + 0.5) * h).exp();
                let level = Tensor::full([n], sigma, (Kind::Float, Device::Cpu));
                let eps = edm::draw_eps(&x, cfg.embed_dim);
                // ∫ f / sigma^3 dsigma = ∫ f / sigma^2 dln(sigma): width h per node.
                diffusion_share_with(&net, &x, &level, &eps, h)
                    .mean(Kind::Double)
                    .double_value(&[])
            })
            .sum()
    });
    let (d, d_se) = stats(&diffusion);
    assert!(
        (quad - d).abs() < 4.0 * d_se + 0.01,
        "quadrature {quad} vs estimator {d} ± {d_se}"
    );
}

/// `eval::edm_bound` reports shares that add up to its total, terms that add up too, a
/// total CE that is the mass-weighted mixture of the blocks' CEs, and each block's sigmas.
#[test]
fn edm_report_adds_up() {
    let cfg = edm_cfg();
    let t = Trainer::new(
        &tiny(cfg.clone()),
        Objective::Edm {
            lo: cfg.sigma_min,
            hi: cfg.sigma_max,
        },
        OptimConfig::default(),
        Device::Cpu,
        4,
    )
    .unwrap();
    let windows = bytes(32, 16, 5);
    // Unequal masses, so a plain mean of the blocks' CEs would differ from the mixture.
    let schedule = Schedule::from_boundaries(vec![0.0, 0.2, 0.5, 1.0]).unwrap();
    let settings = EvalSettings {
        samples: 2,
        batch: 16,
        seed: 0,
        device: Device::Cpu,
    };
    let nets = [&t.net, &t.net, &t.net];
    let r = eval::edm_bound(&nets, &cfg, &schedule, &windows, &settings, &mut |_| {});
    let sum: f64 = r.shares.iter().map(|s| s.nats).sum();
    assert!((sum - r.nats).abs() < 1e-9, "{sum} vs {}", r.nats);
    let terms = r.terms.as_ref().unwrap();
    let parts = terms.prior.nats + terms.diffusion.nats + terms.reconstruction.nats;
    assert!((parts - r.nats).abs() < 1e-9);
    let ce_mix: f64 = r
        .shares
        .iter()
        .zip([0.2, 0.3, 0.5])
        .map(|(s, mass)| s.ce.unwrap().nats * mass)
        .sum();
    assert!((ce_mix - r.ce.unwrap().nats).abs() < 1e-9);
    let bounds = cfg.sigma_bounds(&schedule);
    assert!(r
        .shares
        .iter()
        .zip(bounds.windows(2))
        .all(|(s, w)| s.lo == w[0] && s.hi == w[1]));
    // An untrained network predicts uniform bytes: CE about ln 256 at every sigma.
    assert!((r.ce.unwrap().nats - 256f64.ln()).abs() < 0.1);
    let again = eval::edm_bound(&nets, &cfg, &schedule, &windows, &settings, &mut |_| {});
    assert_eq!(again.nats, r.nats, "a fixed seed gives the same draws");
}

/// Blocks stay independent: the byte table is no variable (never trained, never in a
/// checkpoint or delta), and training block 1 leaves block 2 untouched. Training
/// lowers the CE on a repeated sentence.
#[test]
fn edm_blocks_train_alone_and_learn() {
    let cfg = edm_cfg();
    let sigmas = cfg.sigma_bounds(&Schedule::equal(2));
    let optim = OptimConfig {
        lr: 3e-3,
        warmup: 10,
        ..Default::default()
    };
    let mut b1 = Trainer::new(
        &tiny(cfg.clone()),
        Objective::Edm {
            lo: sigmas[0],
            hi: sigmas[1],
        },
        optim.clone(),
        Device::Cpu,
        1,
    )
    .unwrap();
    let b2 = Trainer::new(
        &tiny(cfg.clone()),
        Objective::Edm {
            lo: sigmas[1],
            hi: sigmas[2],
        },
        optim,
        Device::Cpu,
        2,
    )
    .unwrap();
    assert!(b1.weights().keys().all(|k| !k.contains("table")));
    assert!(b1.net.table().equal(b2.net.table()), "one table per run");
    let before: Vec<(String, Tensor)> = b2
        .weights()
        .into_iter()
        .map(|(k, v)| (k, v.copy()))
        .collect();
    let text = b"the cat sat on the mat. ".repeat(40);
    let windows = blocktrain_model::data::heldout_windows(&text, 16, 0);
    let mut sampler =
        blocktrain_model::data::WindowSampler::new(&text, 16, 1, Device::Cpu).unwrap();
    let ce = |net: &Denoiser| {
        tch::manual_seed(9);
        tch::no_grad(|| {
            edm::ce_estimate(net, &cfg, &windows, sigmas[0], sigmas[1], Draw::Stratified)
                .mean(Kind::Double)
                .double_value(&[])
        })
    };
    let start = ce(&b1.net);
    for _ in 0..150 {
        let _ = b1.train_step(&sampler.next_batch(16), 150);
    }
    let end = ce(&b1.net);
    assert!(
        end < 0.5 * start,
        "CE on a repeated sentence went {start} -> {end}"
    );
    for (name, old) in before {
        let now = &b2.weights()[&name];
        assert!(now.equal(&old), "{name} of block 2 changed");
        assert!(!now.grad().defined(), "{name} of block 2 got a gradient");
    }
}

/// The sampler: a block keeps the latent's shape, its steps run from the top of its
/// interval to the bottom in mass, the prompt survives, every output byte comes back,
/// seeds fix the output, and Heun differs from Euler.
#[test]
fn edm_sampler_shapes_levels_and_seeds() {
    let cfg = edm_cfg();
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Denoiser::new(&vs.root(), &tiny(cfg.clone()));
    let schedule = Schedule::equal(3);
    let bounds = cfg.sigma_bounds(&schedule);
    let levels = edm_sampler::step_levels(&cfg, 1.0 / 3.0, 2.0 / 3.0, 4);
    assert_eq!(levels.len(), 5);
    assert!((levels[0] - bounds[2]).abs() < 1e-9 && (levels[4] - bounds[1]).abs() < 1e-9);
    assert!(levels.windows(2).all(|w| w[0] > w[1]), "{levels:?}");
    let mut rng = SampleRng::for_block(7, 2);
    let z = edm_sampler::initial_latent(net.table(), &cfg, b"Hi", 10, &mut rng, Device::Cpu);
    assert_eq!(z.size(), vec![1, 12, cfg.embed_dim]);
    let s = SampleSettings {
        steps_per_block: 3,
        ..Default::default()
    };
    let out = edm_sampler::denoise_sigma_interval(&net, &z, b"Hi", 2.0 / 3.0, 1.0, &s);
    assert_eq!(out.size(), z.size());
    // Prompt positions stay on the line e + sigma * eps0 of their own clean embedding.
    let e = net
        .table()
        .index_select(0, &Tensor::from_slice(&[b'H' as i64, b'i' as i64]));
    let eps0 = (z.narrow(1, 0, 2).squeeze_dim(0) - &e) / bounds[3];
    let expect = &e + eps0 * bounds[2];
    assert!(out
        .narrow(1, 0, 2)
        .squeeze_dim(0)
        .allclose(&expect, 1e-4, 1e-4, false));
    let nets = [&net, &net, &net];
    let gen = |seed, heun| {
        let s = SampleSettings {
            steps_per_block: 3,
            heun,
            ..Default::default()
        };
        edm_sampler::generate(&nets, &schedule, b"Hi", 10, &s, seed, Device::Cpu)
    };
    let a = gen(1, false);
    assert_eq!(a.len(), 10);
    assert_eq!(a, gen(1, false));
    assert_ne!(a, gen(2, false));
    let heun = SampleSettings { heun: true, ..s };
    let second = edm_sampler::denoise_sigma_interval(&net, &z, b"Hi", 2.0 / 3.0, 1.0, &heun);
    assert!(
        !second.allclose(&out, 1e-6, 1e-6, false),
        "Heun takes other steps"
    );
    assert_eq!(edm_sampler::evaluations(3, true), 6);
}
