//! Masked diffusion: a stage's blocks unmask positions, highest block first.
use blocktrain_model::config::Schedule;
use blocktrain_model::sampler::masked::{denoise_interval_batch, BatchRow};
use blocktrain_model::sampler::{self, SampleRng, SampleSettings};
use blocktrain_protocol::frame::LatentState;
use tch::{Device, Tensor};

use super::{bad, refused, settings, DenoiseJob, DenoiseOut, Hosted, Net};
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

    /// [`Hosted::denoise_masked`] for jobs of one batch key: each block runs its steps
    /// on all of them together, every row from its own stream of its own seed.
    pub(super) fn masked_batch(
        &self,
        nets: &[Net],
        schedule: &Schedule,
        jobs: &[&DenoiseJob],
    ) -> Vec<DenoiseOut> {
        let first = self.info.blocks.first as usize;
        let each: Vec<SampleSettings> = jobs.iter().map(|j| settings(&j.sampling)).collect();
        // Rows this server takes (index into `jobs`) and their ids.
        let mut rows: Vec<(usize, Vec<i64>)> = jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| j.latent.is_none())
            .map(|(i, j)| (i, j.tokens.iter().map(|&t| t as i64).collect()))
            .collect();
        for (i, net) in nets.iter().enumerate().rev() {
            let idx = first + i - 1; // 0-based interval
            let (lo, hi) = schedule.interval(idx);
            let mut batch: Vec<BatchRow> = rows
                .iter_mut()
                .map(|(j, ids)| BatchRow {
                    ids: std::mem::take(ids),
                    settings: &each[*j],
                    rng: SampleRng::for_block(jobs[*j].seed, idx),
                })
                .collect();
            denoise_interval_batch(&net.net, &mut batch, lo, hi, self.device);
            for ((_, ids), row) in rows.iter_mut().zip(batch) {
                *ids = row.ids;
            }
        }
        let mut done = rows.into_iter().peekable();
        (0..jobs.len())
            .map(|i| match done.next_if(|(j, _)| *j == i) {
                Some((_, ids)) => Ok((ids.into_iter().map(|v| v as u16).collect(), None)),
                None => Err(refused(
                    "this server hosts masked-diffusion blocks and takes no latent",
                )),
            })
            .collect()
    }
}
