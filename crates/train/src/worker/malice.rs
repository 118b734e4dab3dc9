//! The test-only tampering of a malicious worker.
use blocktrain_protocol::codec::Arrays;

/// How a malicious test worker tampers with its updates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Malice {
    /// Sends -delta.
    Flip,
    /// Sends k x delta.
    Scale(f32),
    /// Sends Gaussian noise with each tensor's RMS.
    Random,
}

impl std::str::FromStr for Malice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "flip" => Ok(Malice::Flip),
            "random" => Ok(Malice::Random),
            _ => s
                .strip_prefix("scale:")
                .and_then(|k| k.parse().ok())
                .map(Malice::Scale)
                .ok_or_else(|| format!("malice must be flip, random or scale:K, got {s:?}")),
        }
    }
}

impl Malice {
    /// The tampered version of `delta`.
    pub fn apply(self, delta: &Arrays, seed: u64) -> Arrays {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        delta
            .iter()
            .map(|(name, a)| {
                let rms = crate::merge::rms(a) as f32;
                let data = a
                    .data
                    .iter()
                    .map(|&v| match self {
                        Malice::Flip => -v,
                        Malice::Scale(k) => k * v,
                        Malice::Random => {
                            // Box-Muller: a normal draw scaled to the tensor's RMS.
                            let (u1, u2): (f32, f32) =
                                (rng.random::<f32>().max(1e-9), rng.random());
                            rms * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                        }
                    })
                    .collect();
                (
                    name.clone(),
                    blocktrain_protocol::codec::Array {
                        shape: a.shape.clone(),
                        data,
                    },
                )
            })
            .collect()
    }
}
