//! Byte corpora, splits, training windows and held-out windows.
//!
//! The shipped corpora are compiled into the binary (gzip, 4.7 MB), so every command
//! works from any directory of a fresh clone with nothing downloaded.
use std::io::Read;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::{ModelError, Result};

const WIKITEXT2_TRAIN: &[u8] = include_bytes!("../../../data/wikitext-2/wiki.train.tokens.gz");
const WIKITEXT2_VALID: &[u8] = include_bytes!("../../../data/wikitext-2/wiki.valid.tokens.gz");
const WIKITEXT2_TEST: &[u8] = include_bytes!("../../../data/wikitext-2/wiki.test.tokens.gz");
const SHAKESPEARE: &[u8] = include_bytes!("../../../data/tinyshakespeare/input.txt.gz");

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training bytes: the only split a trainer reads.
    Train,
    /// Held-out, for choices (boundaries, profiles).
    Valid,
    /// Held-out, for reported numbers.
    Test,
}

impl Split {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

/// A named dataset: a shipped one or a user file.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Dataset {
    /// WikiText-2, tokenized variant (`wiki.*.tokens`, with `<unk>`), CC BY-SA 3.0.
    WikiText2,
    /// Tiny Shakespeare; no official split, so the last 10% is held out (valid = test).
    Shakespeare,
    /// A user file: last 10% held out (valid = test).
    File(String),
}

impl Dataset {
    /// Parses `wikitext2`, `shakespeare`, or a path to a file of bytes (`.gz` is unpacked).
    pub fn parse(name: &str) -> Self {
        match name {
            "wikitext2" | "wikitext-2" => Dataset::WikiText2,
            "shakespeare" | "tinyshakespeare" => Dataset::Shakespeare,
            path => Dataset::File(path.to_string()),
        }
    }

    /// How tables should name this dataset.
    pub fn describe(&self) -> String {
        match self {
            Dataset::WikiText2 => "WikiText-2 (tokenized variant, wiki.*.tokens)".into(),
            Dataset::Shakespeare => "Tiny Shakespeare (last 10% held out)".into(),
            Dataset::File(p) => format!("{p} (last 10% held out)"),
        }
    }

    /// The bytes of one split.
    pub fn load(&self, split: Split) -> Result<Vec<u8>> {
        match self {
            Dataset::WikiText2 => gunzip(
                match split {
                    Split::Train => WIKITEXT2_TRAIN,
                    Split::Valid => WIKITEXT2_VALID,
                    Split::Test => WIKITEXT2_TEST,
                },
                "wikitext-2",
            ),
            Dataset::Shakespeare => Ok(tail_split(gunzip(SHAKESPEARE, "tinyshakespeare")?, split)),
            Dataset::File(path) => {
                let raw = std::fs::read(path).map_err(|source| ModelError::Io {
                    path: path.clone(),
                    source,
                })?;
                let bytes = if Path::new(path).extension().is_some_and(|e| e == "gz") {
                    gunzip(&raw, path)?
                } else {
                    raw
                };
                Ok(tail_split(bytes, split))
            }
        }
    }
}

fn gunzip(gz: &[u8], what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut out)
        .map_err(|e| ModelError::Corrupt(format!("{what}: bad gzip data: {e}")))?;
    Ok(out)
}

/// First 90% for training, the rest held out.
fn tail_split(mut bytes: Vec<u8>, split: Split) -> Vec<u8> {
    let cut = bytes.len() * 9 / 10;
    match split {
        Split::Train => {
            bytes.truncate(cut);
            bytes
        }
        Split::Valid | Split::Test => bytes.split_off(cut),
    }
}

/// Training windows drawn from a byte corpus that lives on the device: only the N
/// window offsets cross from host to device per batch.
#[derive(Debug)]
pub struct WindowSampler {
    corpus: Tensor, // (len) uint8 on device
    window: i64,
    rng: ChaCha8Rng,
    offsets: Vec<i64>,
    positions: Tensor, // (1, window): 0..window, built once
}

impl WindowSampler {
    /// Windows of `window` bytes from `bytes`, in an order fixed by `seed`.
    pub fn new(bytes: &[u8], window: i64, seed: u64, device: Device) -> Result<Self> {
        if (bytes.len() as i64) <= window {
            return Err(ModelError::Config(format!(
                "corpus of {} bytes is shorter than one window of {window}",
                bytes.len()
            )));
        }
        let corpus = Tensor::from_slice(bytes).to_device(device);
        Ok(WindowSampler {
            corpus,
            window,
            rng: ChaCha8Rng::seed_from_u64(seed),
            offsets: Vec::new(),
            positions: Tensor::arange(window, (Kind::Int64, device)).unsqueeze(0),
        })
    }

    /// Moves the data order to batch number `batches` (for resuming).
    pub fn skip(&mut self, batches: u64, batch: i64) {
        for _ in 0..batches {
            for _ in 0..batch {
                let _ = self.rng.random_range(0..self.max_offset());
            }
        }
    }

    fn max_offset(&self) -> i64 {
        self.corpus.size()[0] - self.window
    }

    /// Next batch (N, window) of int64 byte ids. (Offsets stop one short of the last
    /// possible window; kept so seeded data orders stay comparable across versions.)
    pub fn next_batch(&mut self, n: i64) -> Tensor {
        let max = self.max_offset();
        self.offsets.clear();
        for _ in 0..n {
            self.offsets.push(self.rng.random_range(0..max));
        }
        let device = self.corpus.device();
        let starts = Tensor::from_slice(&self.offsets).to_device(device); // (N)
        let index = starts.unsqueeze(1) + &self.positions; // (N, T)
        self.corpus.take(&index).to_kind(Kind::Int64)
    }
}

/// Non-overlapping held-out windows (W, window) int64; the tail shorter than a window
/// is dropped. `max_windows` keeps an evenly spaced subset (0 = all).
pub fn heldout_windows(bytes: &[u8], window: i64, max_windows: usize) -> Tensor {
    let w = window as usize;
    let all = bytes.len() / w;
    let keep = if max_windows == 0 {
        all
    } else {
        max_windows.min(all)
    };
    let mut out = Vec::with_capacity(keep * w);
    for i in 0..keep {
        let idx = i * all / keep;
        out.extend_from_slice(&bytes[idx * w..(idx + 1) * w]);
    }
    Tensor::from_slice(&out)
        .view([keep as i64, window])
        .to_kind(Kind::Int64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_wikitext_has_the_documented_sizes() {
        assert_eq!(
            Dataset::WikiText2.load(Split::Train).unwrap().len(),
            10_797_148
        );
        assert_eq!(
            Dataset::WikiText2.load(Split::Valid).unwrap().len(),
            1_121_681
        );
        assert_eq!(
            Dataset::WikiText2.load(Split::Test).unwrap().len(),
            1_256_449
        );
    }

    #[test]
    fn heldout_windows_do_not_overlap() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let w = heldout_windows(&bytes, 100, 0);
        assert_eq!(w.size(), vec![10, 100]);
        assert_eq!(w.int64_value(&[1, 0]), 100);
        let sub = heldout_windows(&bytes, 100, 3);
        assert_eq!(sub.size(), vec![3, 100]);
    }

    #[test]
    fn sampler_is_seeded() {
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 256) as u8).collect();
        let mut a = WindowSampler::new(&bytes, 16, 7, Device::Cpu).unwrap();
        let mut b = WindowSampler::new(&bytes, 16, 7, Device::Cpu).unwrap();
        assert!(a.next_batch(4).equal(&b.next_batch(4)));
        let mut c = WindowSampler::new(&bytes, 16, 7, Device::Cpu).unwrap();
        c.skip(1, 4);
        assert!(a.next_batch(4).equal(&c.next_batch(4)));
        assert!(WindowSampler::new(&bytes[..10], 16, 7, Device::Cpu).is_err());
    }
}
