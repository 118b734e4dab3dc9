//! Embedding diffusion: the latent z crosses between stages at the boundary's sigma;
//! the top stage draws the starting noise, block 1 reads the bytes out.
use blocktrain_model::config::{EdmConfig, Schedule};
use blocktrain_model::objective::edm::LatentNet;
use blocktrain_model::sampler::{edm as edm_sampler, SampleRng, SampleSettings};
use blocktrain_protocol::frame::{LatentState, MASK_TOKEN};
use tch::{Device, Kind, Tensor};

use super::{bad, refused, settings, DenoiseJob, DenoiseOut, Hosted, Net};
use crate::ServeError;

/// A request checked and ready for this stage's blocks.
struct Started {
    /// The leading bytes; every position after them is output.
    prompt: Vec<u8>,
    /// The latent (1, T, e) at the top of this stage's blocks.
    z: Tensor,
}

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
        let Started { prompt, mut z } =
            self.start_latent(nets, schedule, edm, tokens, latent, seed)?;
        let first = self.info.blocks.first;
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
            let bytes = edm_sampler::readout(&nets[0].net, &z, prompt.len(), settings, &mut rng);
            let out = prompt.iter().chain(&bytes).map(|&b| b as u16).collect();
            return Ok((out, None));
        }
        Ok((tokens.to_vec(), Some(self.latent_out(schedule, edm, &z)?)))
    }

    /// [`Hosted::denoise_latent`] for jobs of one batch key: each block integrates all
    /// their latents together (the ODE draws nothing), the top stage draws each starting
    /// latent and block 1 each read-out from the job's own streams.
    pub(super) fn latent_batch(
        &self,
        nets: &[Net],
        schedule: &Schedule,
        edm: &EdmConfig,
        jobs: &[&DenoiseJob],
    ) -> Vec<DenoiseOut> {
        let mut out: Vec<Option<DenoiseOut>> = jobs.iter().map(|_| None).collect();
        let mut rows: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut zs: Vec<Tensor> = Vec::new();
        for (i, j) in jobs.iter().enumerate() {
            let started =
                self.start_latent(nets, schedule, edm, &j.tokens, j.latent.as_ref(), j.seed);
            match started {
                Ok(Started { prompt, z }) => {
                    rows.push((i, prompt));
                    zs.push(z);
                }
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        if !rows.is_empty() {
            // The batch shares steps and Heun's choice; temperature and top-k are the rows'.
            let each: Vec<SampleSettings> = rows
                .iter()
                .map(|(i, _)| settings(&jobs[*i].sampling))
                .collect();
            let prompts: Vec<&[u8]> = rows.iter().map(|(_, p)| p.as_slice()).collect();
            let mut z = Tensor::cat(&zs, 0);
            let first = self.info.blocks.first;
            for (i, net) in nets.iter().enumerate().rev() {
                let block = first as usize + i; // 1-based
                let (u_lo, u_hi) = schedule.interval(block - 1);
                z = edm_sampler::denoise_sigma_interval_batch(
                    &net.net, &z, &prompts, u_lo, u_hi, &each[0],
                );
                if block > 1 {
                    z = edm_sampler::hand_off(&z);
                }
            }
            if first == 1 {
                let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
                let refs: Vec<&SampleSettings> = each.iter().collect();
                let mut rngs: Vec<SampleRng> = rows
                    .iter()
                    .map(|(i, _)| SampleRng::for_readout(jobs[*i].seed))
                    .collect();
                let bytes = edm_sampler::readout_batch(&nets[0].net, &z, &lens, &refs, &mut rngs);
                for ((i, prompt), b) in rows.iter().zip(bytes) {
                    let ids = prompt.iter().chain(&b).map(|&b| b as u16).collect();
                    out[*i] = Some(Ok((ids, None)));
                }
            } else {
                for (r, (i, _)) in rows.iter().enumerate() {
                    let zr = z.narrow(0, r as i64, 1);
                    let state = self.latent_out(schedule, edm, &zr);
                    out[*i] = Some(state.map(|s| (jobs[*i].tokens.clone(), Some(s))));
                }
            }
        }
        out.into_iter()
            .map(|r| r.expect("every job has a result"))
            .collect()
    }

    /// Checks a request against this stage and gives the latent its blocks start from:
    /// drawn from the prior (top stage) or the one the stage above handed on.
    fn start_latent(
        &self,
        nets: &[Net],
        schedule: &Schedule,
        edm: &EdmConfig,
        tokens: &[u16],
        latent: Option<&LatentState>,
        seed: u64,
    ) -> Result<Started, ServeError> {
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
        Ok(Started { prompt, z })
    }

    /// The latent (1, T, e) this stage hands on, at the sigma its lowest block ends at.
    fn latent_out(
        &self,
        schedule: &Schedule,
        edm: &EdmConfig,
        z: &Tensor,
    ) -> Result<LatentState, ServeError> {
        let values: Vec<f32> =
            Vec::try_from(z.to_kind(Kind::Float).to_device(Device::Cpu).view([-1]))
                .map_err(|e| bad(format!("reading the latent back: {e}")))?;
        Ok(LatentState {
            width: edm.embed_dim as u32,
            sigma: edm.sigma_at(schedule.interval(self.info.blocks.first as usize - 1).0),
            values,
        })
    }
}
