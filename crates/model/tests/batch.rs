//! Batched sampling: several requests share the network's forward passes and each gets
//! exactly what it gets alone (its own draws, the same latents, the same bytes).
use blocktrain_model::config::{EdmConfig, ModelConfig, Schedule};
use blocktrain_model::objective::edm::LatentNet;
use blocktrain_model::sampler::edm as edm_sampler;
use blocktrain_model::sampler::masked::{denoise_interval_batch, BatchRow};
use blocktrain_model::sampler::{denoise_interval, SampleRng, SampleSettings};
use blocktrain_model::transformer::Denoiser;
use blocktrain_model::MASK_ID;
use tch::{nn, Device, Kind, Tensor};

fn net(edm: Option<EdmConfig>, seed: i64) -> (nn::VarStore, Denoiser) {
    let cfg = ModelConfig {
        d_model: 32,
        n_layers: 2,
        n_heads: 2,
        mlp_ratio: 2,
        window: 16,
        causal: false,
        t_cond: true,
        edm,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(seed);
    let net = Denoiser::new(&vs.root(), &cfg);
    (vs, net)
}

fn settings(steps: usize, temperature: f64, top_k: i64, heun: bool) -> SampleSettings {
    SampleSettings {
        steps_per_block: steps,
        temperature,
        top_k,
        top_p: 1.0,
        heun,
    }
}

/// `prompt` then MASK up to `len` ids.
fn masked(prompt: &[u8], len: usize) -> Vec<i64> {
    let mut ids: Vec<i64> = prompt.iter().map(|&b| b as i64).collect();
    ids.resize(len, MASK_ID);
    ids
}

/// One forward over N rows at one shared level gives each row the logits of its own
/// forward, bit for bit: the level goes in as one value (its conditioning is then a
/// one-row matmul, as alone), and the layers' matmuls do not depend on the row count
/// once a sequence is a few positions long (on CPU, libtorch's BLAS takes another
/// kernel for a matmul of very few rows: 1 or 2 positions on the first CI machine, 3
/// as well on an AMD EPYC, so the shortest case here is 16; see ARCHITECTURE.md).
#[test]
fn a_batched_forward_at_one_level_is_each_rows_forward_bit_for_bit() {
    let (_vs, net) = net(None, 1);
    tch::manual_seed(5);
    for (n, len) in [(2i64, 16i64), (4, 24), (8, 64)] {
        let x = Tensor::randint(257, [n, len], (Kind::Int64, Device::Cpu));
        let t = Tensor::full([1], 0.6, (Kind::Float, Device::Cpu));
        let all = tch::no_grad(|| net.forward(&x, Some(&t)));
        for r in 0..n {
            let one = tch::no_grad(|| net.forward(&x.narrow(0, r, 1), Some(&t)));
            assert!(all.narrow(0, r, 1).equal(&one), "row {r} of {n} x {len}");
        }
    }
}

/// Rows of one batch with their own seeds, prompts and temperature/top-k, over three
/// intervals as three blocks would run them: every row ends with the bytes it gets when
/// denoised alone, short rows (another matmul kernel) included.
#[test]
fn masked_rows_denoised_together_get_the_bytes_each_gets_alone() {
    let (_vs, net) = net(None, 2);
    let schedule = Schedule::equal(3);
    let plain = settings(4, 1.0, 0, false);
    let sharp = settings(4, 0.7, 5, false);
    for len in [1usize, 2, 24] {
        // (prompt, settings, seed); the last row has nothing left to reveal.
        let given = vec![b'z'; len];
        let rows: Vec<(&[u8], &SampleSettings, u64)> = vec![
            (b"", &plain, 1),
            (b"H", &plain, 2),
            (b"Hello", &sharp, 3),
            (b"", &sharp, 1),
            (&given, &plain, 4),
        ];
        let mut batch: Vec<Vec<i64>> = rows.iter().map(|r| masked(r.0, len)).collect();
        let mut alone = batch.clone();
        for b in (0..schedule.blocks()).rev() {
            let (lo, hi) = schedule.interval(b);
            let mut br: Vec<BatchRow> = batch
                .iter()
                .zip(&rows)
                .map(|(ids, &(_, s, seed))| BatchRow {
                    ids: ids.clone(),
                    settings: s,
                    rng: SampleRng::for_block(seed, b),
                })
                .collect();
            let passes = denoise_interval_batch(&net, &mut br, lo, hi, Device::Cpu);
            assert!(passes <= 4, "one forward per step at most: {passes}");
            batch = br.into_iter().map(|r| r.ids).collect();
            let mut passes_alone = 0;
            for (ids, &(_, s, seed)) in alone.iter_mut().zip(&rows) {
                // The passes this row needs alone, counted by a batch of one.
                let mut one = [BatchRow {
                    ids: ids.clone(),
                    settings: s,
                    rng: SampleRng::for_block(seed, b),
                }];
                passes_alone += denoise_interval_batch(&net, &mut one, lo, hi, Device::Cpu);
                let x = Tensor::from_slice(ids).view([1, -1]);
                let mut rng = SampleRng::for_block(seed, b);
                let y = denoise_interval(&net, &x, lo, hi, s, &mut rng);
                *ids = Vec::try_from(y.view([-1])).unwrap();
                assert_eq!(*ids, one[0].ids, "a batch of one is the unbatched sampler");
            }
            if len == 24 {
                assert!(
                    passes < passes_alone,
                    "{passes} passes vs {passes_alone} alone"
                );
            }
        }
        assert_eq!(batch, alone, "length {len}");
        assert!(batch.iter().flatten().all(|&t| t != MASK_ID));
        // Seeds 1 twice, at two temperatures: the rows differ (own settings applied).
        if len == 24 {
            assert_ne!(batch[0], batch[3]);
        }
    }
}

fn edm_cfg() -> EdmConfig {
    EdmConfig {
        embed_dim: 16,
        ..EdmConfig::default()
    }
}

/// The embedding family: latents of rows with their own prompts and seeds go through
/// two blocks (Euler and Heun) together; each row's latent at every hand-off equals its
/// own run's bit for bit, and the read-out gives each row its own bytes.
#[test]
fn edm_rows_integrated_together_match_each_row_alone() {
    let (_vs, top) = net(Some(edm_cfg()), 3);
    let (_vs2, low) = net(Some(edm_cfg()), 4);
    let cfg = edm_cfg();
    let schedule = Schedule::equal(2);
    let len = 12usize;
    let prompts: [&[u8]; 3] = [b"", b"Hi", b"Hello"];
    let seeds = [7u64, 8, 7];
    for heun in [false, true] {
        let plain = settings(3, 1.0, 0, heun);
        let sharp = settings(3, 0.5, 4, heun);
        let each: [&SampleSettings; 3] = [&plain, &plain, &sharp];
        let start = |i: usize| {
            let mut rng = SampleRng::for_block(seeds[i], 1);
            let out = len - prompts[i].len();
            edm_sampler::initial_latent(top.table(), &cfg, prompts[i], out, &mut rng, Device::Cpu)
        };
        let mut alone: Vec<Tensor> = (0..3).map(start).collect();
        let mut z = Tensor::cat(&alone, 0);
        for (b, net) in [(1usize, &top), (0, &low)] {
            let (u_lo, u_hi) = schedule.interval(b);
            z = edm_sampler::denoise_sigma_interval_batch(net, &z, &prompts, u_lo, u_hi, &plain);
            for (i, zi) in alone.iter_mut().enumerate() {
                *zi = edm_sampler::denoise_sigma_interval(net, zi, prompts[i], u_lo, u_hi, &plain);
            }
            if b > 0 {
                z = edm_sampler::hand_off(&z);
                alone = alone.iter().map(edm_sampler::hand_off).collect();
            }
            for (i, zi) in alone.iter().enumerate() {
                assert!(
                    z.narrow(0, i as i64, 1).equal(zi),
                    "row {i} after block {b}"
                );
            }
        }
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let mut rngs: Vec<SampleRng> = seeds.iter().map(|&s| SampleRng::for_readout(s)).collect();
        let bytes = edm_sampler::readout_batch(&low, &z, &lens, &each, &mut rngs);
        for i in 0..3 {
            let mut rng = SampleRng::for_readout(seeds[i]);
            let one = edm_sampler::readout(&low, &alone[i], lens[i], each[i], &mut rng);
            assert_eq!(bytes[i], one, "row {i}");
            assert_eq!(one.len(), len - lens[i]);
        }
        assert_ne!(bytes[0][..7], bytes[2][..7], "own prompts and settings");
    }
}
