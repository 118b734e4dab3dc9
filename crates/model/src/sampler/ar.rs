//! Autoregressive sampling from the causal reference, with a KV cache.
use tch::{Device, Tensor};

use super::{sample_bytes, SampleRng, SampleSettings};
use crate::transformer::{Denoiser, KvCache};
use crate::{MASK_ID, OUTPUT_VOCAB};

/// Autoregressive sampling from the AR reference with a KV cache; output byte `p`
/// (0-based) is drawn with [`SampleRng::for_ar`]`(seed, p)`.
///
/// The context starts with the start token (MASK) and the prompt, cut to the last
/// `window` ids. Rotary positions stay inside the trained window: when the context
/// would outgrow it, the cache is rebuilt from the last `window / 2` ids, so every byte
/// sees between `window / 2` and `window` ids of context.
pub fn generate_ar(
    net: &Denoiser,
    prompt: &[u8],
    len: usize,
    s: &SampleSettings,
    seed: u64,
    device: Device,
) -> Vec<u8> {
    let window = (net.config().window as usize).max(2);
    let mut ids: Vec<i64> = std::iter::once(MASK_ID)
        .chain(prompt.iter().map(|&b| b as i64))
        .collect();
    let layers = 0..net.n_layers();
    let mut cache = KvCache::new();
    let mut start = ids.len().saturating_sub(window); // id at the cache's position 0
    tch::no_grad(|| {
        for p in 0..len {
            if ids.len() - start > window {
                start = ids.len() - window / 2;
                cache = KvCache::new();
            }
            let fresh = &ids[start + cache.positions() as usize..];
            let x = Tensor::from_slice(fresh).view([1, -1]).to_device(device);
            let h = net.forward_layers_cached(layers.clone(), &net.embed(&x), &mut cache);
            let logits = net.head_logits(&h.narrow(1, -1, 1)).view([1, OUTPUT_VOCAB]);
            let mut rng = SampleRng::for_ar(seed, p as u64);
            ids.push(sample_bytes(&logits, s, &mut rng)[0] as i64);
        }
    });
    ids[1 + prompt.len()..].iter().map(|&v| v as u8).collect()
}
