//! Embedding diffusion: the latent z crosses between stages at the boundary's sigma;
//! the top stage draws the starting noise, block 1 reads the bytes out.
use blocktrain_model::config::{EdmConfig, Schedule};
use blocktrain_model::objective::edm::LatentNet;
use blocktrain_model::sampler::{edm as edm_sampler, SampleRng, SampleSettings};
use blocktrain_protocol::frame::{LatentState, MASK_TOKEN};
use tch::{Device, Kind, Tensor};

use super::{bad, refused, Hosted, Net};
use crate::ServeError;

impl Hosted {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn denoise_latent(
        &self,
        nets: &[Net],
        schedule: &Schedule,
        edm: &EdmConfig,
        tokens: &[u16],
        latent: Option<&LatentState>,
        settings: &SampleSettings,
        seed: u64,
    ) -> Result<(Vec<u16>, Option<LatentState>), ServeError> {
        // The prompt is the leading bytes; every position after it is output.
        let prompt_len = tokens
            .iter()
            .position(|&t| t >= MASK_TOKEN)
            .ok_or_else(|| refused("nothing to generate: no masked position"))?;
        if tokens[prompt_len..].iter().any(|&t| t != MASK_TOKEN) {
            return Err(refused(
                "embedding diffusion continues a prompt: masked positions must all follow it",
            ));
        }
        let prompt: Vec<u8> = tokens[..prompt_len].iter().map(|&t| t as u8).collect();
        let (n, e) = (tokens.len(), edm.embed_dim);
        let (first, last) = (self.info.blocks.first, self.info.blocks.last);
        let expect_sigma = edm.sigma_at(schedule.interval(last as usize - 1).1);
        let z = match latent {
            None if last == self.info.total => {
                let mut rng = SampleRng::for_block(seed, last as usize - 1);
                let table = nets.last().expect("a stage hosts a block").net.table();
                edm_sampler::initial_latent(
                    table,
                    edm,
                    &prompt,
                    n - prompt_len,
                    &mut rng,
                    self.device,
                )
            }
            None => {
                return Err(refused(format!(
                    "blocks {first}..{last} continue from a latent the stage above sends; none came"
                )))
            }
            Some(_) if last == self.info.total => {
                return Err(refused(
                    "the top stage starts from the prior and takes no latent",
                ))
            }
            Some(z) => {
                if z.width as i64 != e || z.values.len() != n * e as usize {
                    return Err(refused(format!(
                        "latent of width {} with {} values: this model needs {n} x {e}",
                        z.width,
                        z.values.len()
                    )));
                }
                if (z.sigma - expect_sigma).abs() > 1e-6 * expect_sigma {
                    return Err(refused(format!(
                        "latent at sigma {}: blocks {first}..{last} start at sigma {expect_sigma}",
                        z.sigma
                    )));
                }
                Tensor::from_slice(&z.values)
                    .view([1, n as i64, e])
                    .to_device(self.device)
            }
        };
        let mut z = z;
        for (i, net) in nets.iter().enumerate().rev() {
            let block = first as usize + i; // 1-based
            let (u_lo, u_hi) = schedule.interval(block - 1);
            z = edm_sampler::denoise_sigma_interval(&net.net, &z, &prompt, u_lo, u_hi, settings);
            if block > 1 {
                // As on one host: the latent is rounded to f16 between any two blocks,
                // whether the next one is here or on the next server.
                z = edm_sampler::hand_off(&z);
            }
        }
        if first == 1 {
            let mut rng = SampleRng::for_readout(seed);
            let bytes = edm_sampler::readout(&nets[0].net, &z, prompt_len, settings, &mut rng);
            let out = prompt.iter().chain(&bytes).map(|&b| b as u16).collect();
            return Ok((out, None));
        }
        let values: Vec<f32> =
            Vec::try_from(z.to_kind(Kind::Float).to_device(Device::Cpu).view([-1]))
                .map_err(|e| bad(format!("reading the latent back: {e}")))?;
        let state = LatentState {
            width: e as u32,
            sigma: edm.sigma_at(schedule.interval(first as usize - 1).0),
            values,
        };
        Ok((tokens.to_vec(), Some(state)))
    }
}
