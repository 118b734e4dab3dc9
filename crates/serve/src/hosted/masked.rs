//! Masked diffusion: a stage's blocks unmask positions, highest block first.
use blocktrain_model::config::Schedule;
use blocktrain_model::sampler::{self, SampleRng, SampleSettings};
use blocktrain_protocol::frame::LatentState;
use tch::{Device, Tensor};

use super::{bad, refused, Hosted, Net};
use crate::ServeError;

impl Hosted {
    /// Runs the hosted blocks on `tokens`; block b samples from its own stream of `seed`.
    pub(super) fn denoise_masked(
        &self,
        nets: &[Net],
        schedule: &Schedule,
        tokens: &[u16],
        latent: Option<&LatentState>,
        settings: &SampleSettings,
        seed: u64,
    ) -> Result<(Vec<u16>, Option<LatentState>), ServeError> {
        let first = self.info.blocks.first as usize;
        if latent.is_some() {
            return Err(refused(
                "this server hosts masked-diffusion blocks and takes no latent",
            ));
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let mut x = Tensor::from_slice(&ids)
            .view([1, -1])
            .to_device(self.device);
        for (i, net) in nets.iter().enumerate().rev() {
            let idx = first + i - 1; // 0-based interval
            let (lo, hi) = schedule.interval(idx);
            let mut rng = SampleRng::for_block(seed, idx);
            x = sampler::denoise_interval(&net.net, &x, lo, hi, settings, &mut rng);
        }
        let out: Vec<i64> = Vec::try_from(x.view([-1]).to_device(Device::Cpu))
            .map_err(|e| bad(format!("reading tokens back: {e}")))?;
        Ok((out.into_iter().map(|v| v as u16).collect(), None))
    }
}
