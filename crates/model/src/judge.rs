//! Sample quality under one judge. A separately trained, larger AR network (kept out of
//! every comparison) scores each generator's samples by their exact NLL per byte, so
//! generators of different families meet on one scale; the samples' byte-unigram
//! entropy catches a generator that lowers its NLL by repeating itself.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::eval::Estimate;
use crate::objective::ar::ar_nll;
use crate::transformer::Denoiser;
use crate::{ModelError, Result};

/// What the judge makes of a set of samples.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Quality {
    /// Samples scored.
    pub samples: usize,
    /// Bytes per sample.
    pub len: usize,
    /// The judge's NLL, nats per byte: mean over samples, standard error over samples.
    pub nll: Estimate,
    /// Entropy of the byte histogram of all samples together, bits per byte.
    pub unigram_bits: f64,
}

/// Scores `samples` (all of one length, at most the judge's window) with the causal
/// network `judge`, `batch` samples per forward pass.
pub fn judge(judge: &Denoiser, samples: &[Vec<u8>], batch: i64, device: Device) -> Result<Quality> {
    let len = samples.first().map_or(0, Vec::len);
    if samples.is_empty() || len < 2 || samples.iter().any(|s| s.len() != len) {
        return Err(ModelError::Config(
            "the judge scores two or more samples of one length, at least 2 bytes".into(),
        ));
    }
    if !judge.config().causal || len as i64 > judge.config().window {
        return Err(ModelError::Config(format!(
            "the judge must be an AR network with a window of at least {len} bytes (it has {})",
            judge.config().window
        )));
    }
    let flat: Vec<i64> = samples.iter().flatten().map(|&b| b as i64).collect();
    let all = Tensor::from_slice(&flat).view([samples.len() as i64, len as i64]);
    let per_sample = tch::no_grad(|| {
        let parts: Vec<Tensor> = (0..all.size()[0])
            .step_by(batch.max(1) as usize)
            .map(|start| {
                let n = batch.max(1).min(all.size()[0] - start);
                ar_nll(judge, &all.narrow(0, start, n).to_device(device))
                    .to_device(Device::Cpu)
                    .to_kind(Kind::Double)
            })
            .collect();
        Tensor::cat(&parts, 0)
    });
    let n = per_sample.size()[0] as f64;
    let nll = Estimate {
        nats: per_sample.mean(Kind::Double).double_value(&[]),
        se: per_sample.std(true).double_value(&[]) / n.sqrt(),
    };
    Ok(Quality {
        samples: samples.len(),
        len,
        nll,
        unigram_bits: unigram_entropy_bits(samples),
    })
}

/// Entropy in bits of the byte histogram of `samples` pooled.
pub fn unigram_entropy_bits(samples: &[Vec<u8>]) -> f64 {
    let mut counts = [0u64; 256];
    for &b in samples.iter().flatten() {
        counts[b as usize] += 1;
    }
    let total: u64 = counts.iter().sum();
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unigram_entropy_counts_bits() {
        assert_eq!(unigram_entropy_bits(&[b"aaaa".to_vec()]), 0.0);
        assert!((unigram_entropy_bits(&[b"abab".to_vec(), b"cdcd".to_vec()]) - 2.0).abs() < 1e-12);
        let all: Vec<u8> = (0..=255).collect();
        assert!((unigram_entropy_bits(&[all]) - 8.0).abs() < 1e-12);
    }
}
