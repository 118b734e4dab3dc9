//! A batch of requests computed together gives each the result it gets alone.
use blocktrain_model::logical::LogicalShape;
use blocktrain_protocol::frame::{LatentState, Sampling, MASK_TOKEN};
use tch::Device;

use super::{DenoiseJob, DenoiseOut, Hosted, Source};

fn load(shape: &str, blocks: &str) -> Hosted {
    let shape: LogicalShape = shape.parse().unwrap();
    let source = Source::Logical {
        shape: &shape,
        ar: false,
        total: 2,
        seed: 1,
        block_layers: None,
    };
    Hosted::load(source, blocks.parse().unwrap(), Device::Cpu, 64).unwrap()
}

fn job(prompt: &[u8], len: usize, seed: u64, temperature: f64, top_k: u32) -> DenoiseJob {
    let mut tokens: Vec<u16> = prompt.iter().map(|&b| b as u16).collect();
    tokens.resize(len, MASK_TOKEN);
    DenoiseJob {
        tokens,
        latent: None,
        sampling: Sampling {
            steps_per_block: 3,
            temperature,
            top_k,
            top_p: 1.0,
            heun: false,
        },
        seed,
    }
}

fn alone(h: &Hosted, jobs: &[DenoiseJob]) -> Vec<DenoiseOut> {
    jobs.iter()
        .map(|j| h.denoise(&j.tokens, j.latent.as_ref(), &j.sampling, j.seed))
        .collect()
}

/// A result as compared: (tokens, the latent's values as bits) or the error's text.
type Seen = Result<(Vec<u16>, Option<Vec<u32>>), String>;

fn seen(r: &[DenoiseOut]) -> Vec<Seen> {
    let bits = |z: &LatentState| z.values.iter().map(|v| v.to_bits()).collect();
    r.iter()
        .map(|r| match r {
            Ok((t, z)) => Ok((t.clone(), z.as_ref().map(bits))),
            Err(e) => Err(e.to_string()),
        })
        .collect()
}

#[test]
fn masked_jobs_batched_get_what_each_gets_alone() {
    let h = load("d=32,layers=2,heads=2,dtype=f32,window=16", "1..2");
    let mut jobs = vec![
        job(b"", 16, 1, 1.0, 0),
        job(b"Hi", 16, 2, 1.0, 0),
        job(b"Hi", 16, 2, 0.5, 4),
        job(b"Hello", 9, 3, 1.0, 0), // another length: its own batch
        job(b"", 16, 5, 1.0, 0),
    ];
    jobs[4].latent = Some(LatentState {
        width: 1,
        sigma: 1.0,
        values: vec![0.0; 16],
    });
    let batched = h.denoise_batch(&jobs);
    assert_eq!(seen(&batched), seen(&alone(&h, &jobs)));
    assert!(batched[4]
        .as_ref()
        .is_err_and(|e| e.to_string().contains("no latent")));
    let out = |i: usize| batched[i].as_ref().unwrap().0.clone();
    assert!(out(0).iter().all(|&t| t < MASK_TOKEN));
    assert_ne!(out(1), out(2), "each row its own temperature and top-k");
}

#[test]
fn edm_jobs_batched_hand_on_the_latents_and_bytes_each_gets_alone() {
    let shape = "d=32,layers=2,heads=2,dtype=f32,window=16,embed=8";
    let (top, low) = (load(shape, "2"), load(shape, "1"));
    let mut jobs = vec![
        job(b"", 12, 1, 1.0, 0),
        job(b"Hi", 12, 2, 1.0, 0),
        job(b"Hey", 12, 1, 0.5, 4),
        job(b"no mask left", 12, 4, 1.0, 0), // refused: nothing to generate
    ];
    for heun in [false, true] {
        for j in &mut jobs {
            j.sampling.heun = heun;
        }
        let batched = top.denoise_batch(&jobs);
        assert_eq!(seen(&batched), seen(&alone(&top, &jobs)), "heun {heun}");
        assert!(batched[3].is_err());
        // The latents go on to the stage below as the route would carry them.
        let next: Vec<DenoiseJob> = jobs[..3]
            .iter()
            .zip(&batched)
            .map(|(j, r)| {
                let (tokens, z) = r.as_ref().unwrap().clone();
                DenoiseJob {
                    tokens,
                    latent: z,
                    ..j.clone()
                }
            })
            .collect();
        let bytes = low.denoise_batch(&next);
        assert_eq!(seen(&bytes), seen(&alone(&low, &next)), "heun {heun}");
        let out = |i: usize| bytes[i].as_ref().unwrap().0.clone();
        assert_eq!(&out(1)[..2], b"Hi".map(u16::from).as_slice());
        assert!(out(0).iter().all(|&t| t < MASK_TOKEN));
    }
}
