//! The heart of the method: block shares add up to the ELBO, blocks are isolated,
//! and the evaluation behaves as a likelihood should.
use blocktrain_model::config::{ModelConfig, Schedule};
use blocktrain_model::eval::{self, EvalSettings};
use blocktrain_model::objective::masked::{
    estimate_with, interval_estimate, stratified_t, MaskNoise,
};
use blocktrain_model::objective::{Draw, MaskedNet};
use blocktrain_model::optim::OptimConfig;
use blocktrain_model::trainer::{Objective, Trainer};
use blocktrain_model::transformer::Denoiser;
use blocktrain_model::MASK_ID;
use tch::{nn, Device, Kind, Tensor};

fn tiny(causal: bool) -> ModelConfig {
    ModelConfig {
        d_model: 32,
        n_layers: 1,
        n_heads: 2,
        mlp_ratio: 2,
        window: 32,
        causal,
        t_cond: false,
        edm: None,
    }
}

fn settings(samples: usize) -> EvalSettings {
    EvalSettings {
        samples,
        batch: 32,
        seed: 0,
        device: Device::Cpu,
    }
}

fn batch(n: i64, len: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randint(256, [n, len], (Kind::Int64, Device::Cpu))
}

/// On one fixed batch with shared noise, the B block estimates sum exactly to the
/// global [0, 1] estimate: each block scores its rows with weight (t(b) - t(b-1)).
#[test]
fn block_shares_sum_exactly_to_global_estimate_on_a_fixed_batch() {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Denoiser::new(&vs.root(), &tiny(false));
    let schedule = Schedule::from_boundaries(vec![0.0, 0.2, 0.5, 1.0]).unwrap();
    // Unequal widths: give each block rows in proportion so strata align (M_b = width * N).
    let rows = [4i64, 6, 10];
    let n: i64 = rows.iter().sum();
    let x = batch(n, 32, 11);
    let noise = MaskNoise::draw(n, 32, Device::Cpu);
    let u = Tensor::from_slice(&[0.37f32]);
    tch::no_grad(|| {
        let global =
            estimate_with(&net, &x, &stratified_t(n, 0.0, 1.0, &u), &noise, 1.0).mean(Kind::Double);
        let mut sum = 0.0;
        let mut start = 0;
        for (b, &m) in rows.iter().enumerate() {
            let (lo, hi) = schedule.interval(b);
            let part = MaskNoise {
                uniforms: noise.uniforms.narrow(0, start, m),
                forced: noise.forced.narrow(0, start, m),
            };
            let t = stratified_t(m, lo, hi, &u);
            sum += estimate_with(&net, &x.narrow(0, start, m), &t, &part, hi - lo)
                .mean(Kind::Double)
                .double_value(&[]);
            start += m;
        }
        let g = global.double_value(&[]);
        assert!((sum - g).abs() < 1e-5, "blocks {sum} vs global {g}");
    });
}

/// Statistically too: independent Monte-Carlo estimates of the global ELBO and of the
/// sum of block shares agree within a few standard errors.
#[test]
fn block_shares_sum_to_global_elbo_in_expectation() {
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Denoiser::new(&vs.root(), &tiny(false));
    let schedule = Schedule::equal(3);
    let x = batch(64, 32, 12);
    let (mut global, mut blocks) = (Vec::new(), Vec::new());
    tch::no_grad(|| {
        for _ in 0..20 {
            global.push(
                interval_estimate(&net, &x, 0.0, 1.0, Draw::Independent)
                    .mean(Kind::Double)
                    .double_value(&[]),
            );
            let s: f64 = (0..3)
                .map(|b| {
                    let (lo, hi) = schedule.interval(b);
                    interval_estimate(&net, &x, lo, hi, Draw::Independent)
                        .mean(Kind::Double)
                        .double_value(&[])
                })
                .sum();
            blocks.push(s);
        }
    });
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let var = |v: &[f64]| {
        let m = mean(v);
        v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64
    };
    let se = ((var(&global) + var(&blocks)) / 20.0).sqrt();
    let diff = (mean(&global) - mean(&blocks)).abs();
    assert!(
        diff < 4.0 * se + 1e-3,
        "global {} vs blocks {} (se {se})",
        mean(&global),
        mean(&blocks)
    );
}

/// Training block 1 touches nothing of block 2: its weights, moments and grads stay as they were.
#[test]
fn training_one_block_leaves_another_untouched() {
    let cfg = tiny(false);
    let mut b1 = Trainer::new(
        &cfg,
        Objective::Interval { lo: 0.0, hi: 0.5 },
        OptimConfig::default(),
        Device::Cpu,
        1,
    )
    .unwrap();
    let b2 = Trainer::new(
        &cfg,
        Objective::Interval { lo: 0.5, hi: 1.0 },
        OptimConfig::default(),
        Device::Cpu,
        2,
    )
    .unwrap();
    let before: Vec<(String, Tensor)> = b2
        .weights()
        .into_iter()
        .map(|(k, v)| (k, v.copy()))
        .collect();
    let b1_before = b1.weights().values().next().unwrap().copy();
    for s in 0..3 {
        let _ = b1.train_step(&batch(8, 32, s), 10);
    }
    for (name, old) in before {
        let now = &b2.weights()[&name];
        assert!(now.equal(&old), "{name} of block 2 changed");
        assert!(
            !now.grad().defined(),
            "{name} of block 2 received a gradient"
        );
    }
    assert_eq!(b2.steps(), 0);
    assert!(b2
        .opt
        .exp_avg
        .iter()
        .all(|m| m.abs().sum(Kind::Float).double_value(&[]) == 0.0));
    assert!(
        !b1.weights().values().next().unwrap().equal(&b1_before),
        "block 1 did train"
    );
}

/// A fresh network predicts nearly uniform bytes: about ln 256 nats per byte.
#[test]
fn untrained_model_scores_about_ln_256() {
    let t = Trainer::new(
        &tiny(false),
        Objective::Interval { lo: 0.0, hi: 1.0 },
        OptimConfig::default(),
        Device::Cpu,
        4,
    )
    .unwrap();
    let windows = batch(64, 32, 13);
    let schedule = Schedule::equal(2);
    let r = eval::diffusion_elbo(
        &[&t.net, &t.net],
        &schedule,
        &windows,
        &settings(2),
        &mut |_| {},
    );
    let ln256 = 256f64.ln();
    assert!(
        (r.nats - ln256).abs() < 0.1,
        "untrained ELBO {} vs ln256 {ln256}",
        r.nats
    );
    assert!((r.shares[0].nats - ln256 / 2.0).abs() < 0.06);
    assert!(r.se < 0.05);
    let ar = Trainer::new(
        &tiny(true),
        Objective::Autoregressive,
        OptimConfig::default(),
        Device::Cpu,
        4,
    )
    .unwrap();
    let a = eval::ar_nll(&ar.net, &windows, 32, Device::Cpu, &mut |_| {});
    assert!((a.nats - ln256).abs() < 0.1, "untrained AR {}", a.nats);
}

/// On a tiny repeated corpus the block objective and the AR objective both fall far.
#[test]
fn tiny_repeated_corpus_is_learned() {
    let text = b"the cat sat on the mat. ".repeat(40);
    let windows = blocktrain_model::data::heldout_windows(&text, 32, 0);
    let optim = OptimConfig {
        lr: 3e-3,
        warmup: 10,
        ..Default::default()
    };
    let mut block = Trainer::new(
        &tiny(false),
        Objective::Interval { lo: 0.0, hi: 1.0 },
        optim.clone(),
        Device::Cpu,
        6,
    )
    .unwrap();
    let mut sampler =
        blocktrain_model::data::WindowSampler::new(&text, 32, 1, Device::Cpu).unwrap();
    for _ in 0..300 {
        let _ = block.train_step(&sampler.next_batch(16), 300);
    }
    let r = eval::diffusion_elbo(
        &[&block.net],
        &Schedule::equal(1),
        &windows,
        &settings(2),
        &mut |_| {},
    );
    assert!(
        r.nats < 1.2,
        "diffusion ELBO on a repeated sentence stayed at {}",
        r.nats
    );

    let mut ar = Trainer::new(
        &tiny(true),
        Objective::Autoregressive,
        optim,
        Device::Cpu,
        6,
    )
    .unwrap();
    for _ in 0..100 {
        let _ = ar.train_step(&sampler.next_batch(16), 100);
    }
    let a = eval::ar_nll(&ar.net, &windows, 32, Device::Cpu, &mut |_| {});
    assert!(
        a.nats < 1.0,
        "AR NLL on a repeated sentence stayed at {}",
        a.nats
    );
}

/// The AR reference is causal: changing a later byte never changes earlier predictions.
#[test]
fn ar_reference_is_causal() {
    tch::manual_seed(9);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Denoiser::new(&vs.root(), &tiny(true));
    let x = batch(1, 16, 14);
    let y = x.copy();
    let _ = y.narrow(1, 10, 1).fill_(7);
    let (lx, ly) = tch::no_grad(|| (net.forward(&x, None), net.forward(&y, None)));
    assert!(lx
        .narrow(1, 0, 10)
        .allclose(&ly.narrow(1, 0, 10), 1e-5, 1e-6, false));
    assert!(!lx
        .narrow(1, 10, 6)
        .allclose(&ly.narrow(1, 10, 6), 1e-5, 1e-6, false));
}

/// A masked denoiser whose exact ELBO can be computed: position j bets on "left
/// neighbour + 1" with logit `4 (1 - t) + 1` when that neighbour is visible, and on
/// "right neighbour - 1" with logit 2 when that one is, else predicts uniformly. Its
/// loss depends on t and on which positions are masked.
struct NeighbourNet;

impl MaskedNet for NeighbourNet {
    fn masked_logits(&self, tokens: &Tensor, t: &Tensor) -> Tensor {
        let (n, len) = tokens.size2().unwrap();
        let ids: Vec<i64> = Vec::try_from(tokens.reshape([-1])).unwrap();
        let ts: Vec<f32> = Vec::try_from(t.to_kind(Kind::Float)).unwrap();
        let mut out = vec![0f32; (n * len * 256) as usize];
        for r in 0..n as usize {
            let kappa = 4.0 * (1.0 - ts[r]) + 1.0;
            for j in 0..len as usize {
                let at = |k: usize| ids[r * len as usize + k];
                let row = &mut out[(r * len as usize + j) * 256..][..256];
                if j > 0 && at(j - 1) != MASK_ID {
                    row[((at(j - 1) + 1) % 256) as usize] += kappa;
                }
                if j + 1 < len as usize && at(j + 1) != MASK_ID {
                    row[((at(j + 1) + 255) % 256) as usize] += 2.0;
                }
            }
        }
        Tensor::from_slice(&out).view([n, len, 256])
    }
}

/// Against an exact answer: for a window of T = 6 bytes, enumerate all 63 non-empty
/// masks S and integrate `t^(|S|-1) (1-t)^(T-|S|) sum_{j in S} -log p(x_j | x_S)` over t
/// (midpoint rule, 400 nodes): the ELBO exactly. The forced-mask estimator summed over
/// three blocks must agree within its standard error; a wrong weight, a wrong masking
/// rule or a dropped interval would not.
#[test]
fn masked_estimator_matches_exact_enumeration_of_masks() {
    let net = NeighbourNet;
    let x: Vec<i64> = vec![10, 11, 12, 40, 14, 15];
    let len = x.len();
    let nodes = 400;
    let mut exact = 0.0;
    for subset in 1u32..(1 << len) {
        let masked: Vec<usize> = (0..len).filter(|&j| subset >> j & 1 == 1).collect();
        let k = masked.len() as i32;
        let input: Vec<i64> = (0..len)
            .map(|j| if subset >> j & 1 == 1 { MASK_ID } else { x[j] })
            .collect();
        let rows = Tensor::from_slice(&input).view([1, -1]).repeat([nodes, 1]);
        let ts: Vec<f32> = (0..nodes)
            .map(|i| (i as f32 + 0.5) / nodes as f32)
            .collect();
        let logp = net
            .masked_logits(&rows, &Tensor::from_slice(&ts))
            .log_softmax(-1, Kind::Double); // (nodes, T, 256)
        for (i, &t) in ts.iter().enumerate() {
            let t = t as f64;
            let weight = t.powi(k - 1) * (1.0 - t).powi(len as i32 - k) / nodes as f64;
            for &j in &masked {
                exact -= weight * logp.double_value(&[i as i64, j as i64, x[j]]);
            }
        }
    }
    exact /= len as f64;
    let rows = 6000;
    let batch = Tensor::from_slice(&x).view([1, -1]).repeat([rows, 1]);
    tch::manual_seed(17);
    let schedule = Schedule::from_boundaries(vec![0.0, 0.3, 0.55, 1.0]).unwrap();
    let (mut mc, mut var) = (0.0, 0.0);
    for b in 0..3 {
        let (lo, hi) = schedule.interval(b);
        let est = interval_estimate(&net, &batch, lo, hi, Draw::Independent);
        mc += est.mean(Kind::Double).double_value(&[]);
        var += est.var(true).double_value(&[]) / rows as f64;
    }
    let se = var.sqrt();
    assert!(se < 0.02, "standard error {se}");
    assert!(
        (mc - exact).abs() < 4.0 * se,
        "estimator {mc} ± {se} vs exact {exact}"
    );
    // The network's loss does depend on the level: at t near 1 it is near ln 256.
    assert!(exact < 0.9 * 256f64.ln(), "exact ELBO {exact}");
}
