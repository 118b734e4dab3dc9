//! Inference paths: seeded sampling streams and the KV-cached pipeline-stage forward.
use blocktrain_model::config::{ModelConfig, Schedule};
use blocktrain_model::sampler::{self, SampleRng, SampleSettings};
use blocktrain_model::transformer::{Denoiser, KvCache};
use blocktrain_model::MASK_ID;
use tch::{nn, Device, Kind, Tensor};

fn net(causal: bool, t_cond: bool, layers: i64, seed: i64) -> (nn::VarStore, Denoiser) {
    let cfg = ModelConfig {
        d_model: 32,
        n_layers: layers,
        n_heads: 2,
        mlp_ratio: 2,
        window: 16,
        causal,
        t_cond,
        edm: None,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(seed);
    let net = Denoiser::new(&vs.root(), &cfg);
    (vs, net)
}

fn tokens(len: i64) -> Tensor {
    // Bytes and a few MASK ids, two rows.
    Tensor::arange(2 * len, (Kind::Int64, Device::Cpu))
        .multiply_scalar(37)
        .remainder(257)
        .view([2, len])
}

fn close(a: &Tensor, b: &Tensor) -> bool {
    a.allclose(b, 1e-4, 1e-5, false)
}

#[test]
fn sampling_is_seeded_per_block_and_fills_every_mask() {
    let (_vs, net) = net(false, true, 1, 3);
    let schedule = Schedule::equal(3);
    let nets = [&net, &net, &net];
    let s = SampleSettings {
        steps_per_block: 4,
        temperature: 1.0,
        top_k: 20,
        top_p: 1.0,
        heun: false,
    };
    let gen = |seed| sampler::generate(&nets, &schedule, b"Hi", 24, &s, seed, Device::Cpu);
    let a = gen(42);
    assert_eq!(a.len(), 24);
    assert_eq!(a, gen(42));
    assert_ne!(a, gen(43));

    // The same chain, block by block, as separate hosts would run it.
    let ids: Vec<i64> = b"Hi"
        .iter()
        .map(|&b| b as i64)
        .chain(std::iter::repeat_n(MASK_ID, 24))
        .collect();
    let mut x = Tensor::from_slice(&ids).view([1, -1]);
    for b in (0..3).rev() {
        let (lo, hi) = schedule.interval(b);
        let mut rng = SampleRng::for_block(42, b);
        x = sampler::denoise_interval(&net, &x, lo, hi, &s, &mut rng);
    }
    assert_eq!(x.eq(MASK_ID).sum(Kind::Int64).int64_value(&[]), 0);
    assert!(x
        .narrow(1, 0, 2)
        .equal(&Tensor::from_slice(&[72i64, 105]).view([1, 2])));
    let manual: Vec<i64> = Vec::try_from(x.view([-1])).unwrap();
    let manual: Vec<u8> = manual[2..].iter().map(|&v| v as u8).collect();
    assert_eq!(manual, a);
}

#[test]
fn gumbel_draws_follow_the_logits() {
    // A near-one-hot row always picks its byte; top-1 does too whatever the noise.
    let mut logits = vec![0f32; 2 * 256];
    logits[65] = 50.0;
    logits[256 + 10] = 1.0;
    let logits = Tensor::from_slice(&logits).view([2, 256]);
    let greedy = SampleSettings {
        top_k: 1,
        ..Default::default()
    };
    for pos in 0..20 {
        let mut rng = SampleRng::for_ar(1, pos);
        assert_eq!(
            sampler::sample_bytes(&logits, &greedy, &mut rng),
            vec![65, 10]
        );
        let mut rng = SampleRng::for_ar(1, pos);
        let b = sampler::sample_bytes(&logits, &SampleSettings::default(), &mut rng);
        assert_eq!(b[0], 65);
    }
    // Uniform row: draws vary across streams.
    let flat = Tensor::zeros([1, 256], (Kind::Float, Device::Cpu));
    let draws: std::collections::HashSet<u8> = (0..50)
        .map(|b| {
            let mut rng = SampleRng::for_block(9, b);
            sampler::sample_bytes(&flat, &SampleSettings::default(), &mut rng)[0]
        })
        .collect();
    assert!(draws.len() > 30, "{} distinct bytes", draws.len());
}

#[test]
fn ar_generation_is_seeded_and_outlives_the_window() {
    let (_vs, net) = net(true, false, 2, 5);
    let s = SampleSettings::default();
    // 40 bytes > window 16: the cache is rebuilt along the way.
    let a = sampler::generate_ar(&net, b"abc", 40, &s, 7, Device::Cpu);
    assert_eq!(a.len(), 40);
    assert_eq!(
        a,
        sampler::generate_ar(&net, b"abc", 40, &s, 7, Device::Cpu)
    );
    assert_ne!(
        a,
        sampler::generate_ar(&net, b"abc", 40, &s, 8, Device::Cpu)
    );
    // Byte 0 uses stream for_ar(seed, 0): the full forward's last logits give the same.
    let x = Tensor::from_slice(&[MASK_ID, 97, 98, 99]).view([1, 4]);
    let logits = tch::no_grad(|| net.forward(&x, None))
        .get(0)
        .narrow(0, 3, 1);
    let mut rng = SampleRng::for_ar(7, 0);
    assert_eq!(sampler::sample_bytes(&logits, &s, &mut rng)[0], a[0]);
}

#[test]
fn one_cached_call_equals_the_full_forward() {
    let (_vs, net) = net(true, false, 2, 11);
    let x = tokens(12);
    tch::no_grad(|| {
        let full = net.forward(&x, None);
        let mut cache = KvCache::new();
        let h = net.forward_layers_cached(0..net.n_layers(), &net.embed(&x), &mut cache);
        assert_eq!(cache.positions(), 12);
        assert!(close(&net.head_logits(&h), &full));
    });
}

#[test]
fn prefill_then_steps_match_the_full_forward_at_every_length() {
    let (_vs, net) = net(true, false, 2, 12);
    let len = 24; // past the 16-position rotary table
    let x = tokens(len);
    tch::no_grad(|| {
        let mut cache = KvCache::new();
        let mut pos = 0;
        // Prefill 5, a chunk of 3 after a non-empty cache (explicit mask), then singles.
        for chunk in [5, 3]
            .into_iter()
            .chain(std::iter::repeat_n(1, (len - 8) as usize))
        {
            let new = x.narrow(1, pos, chunk);
            let h = net.forward_layers_cached(0..2, &net.embed(&new), &mut cache);
            pos += chunk;
            let cached = net.head_logits(&h.narrow(1, chunk - 1, 1));
            let full = net
                .forward(&x.narrow(1, 0, pos), None)
                .narrow(1, pos - 1, 1);
            assert!(close(&cached, &full), "length {pos}");
        }
        assert_eq!(cache.positions(), len);
    });
}

#[test]
fn two_pipeline_stages_equal_one() {
    let (_vs, net) = net(true, false, 2, 13);
    let x = tokens(10);
    tch::no_grad(|| {
        let (mut one, mut first, mut second) = (KvCache::new(), KvCache::new(), KvCache::new());
        for (pos, chunk) in [(0, 6), (6, 1), (7, 3)] {
            let e = net.embed(&x.narrow(1, pos, chunk));
            let whole = net.forward_layers_cached(0..2, &e, &mut one);
            let mid = net.forward_layers_cached(0..1, &e, &mut first);
            let split = net.forward_layers_cached(1..2, &mid, &mut second);
            assert!(close(&whole, &split), "chunk at {pos}");
        }
        assert_eq!((first.positions(), second.positions()), (10, 10));
    });
}
