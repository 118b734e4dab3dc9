//! The AR baseline: a stage's layers against a session's KV cache; the first stage
//! embeds bytes, the last applies the head and samples (and, when the session asks,
//! reports the model's log-probabilities for that step: [`byte_logprobs`]).
use std::ops::Range;

use blocktrain_model::sampler::{self, SampleRng};
use blocktrain_model::transformer::KvCache;
use blocktrain_protocol::frame::{
    ArPayload, BlockRange, ByteLogprobs, Sampling, ServerInfo, MASK_TOKEN, MAX_TOP_LOGPROBS,
};
use tch::{Device, Kind, Tensor};

use super::{bad, settings, ArStepOut, Hosted, Net, Role};
use crate::ServeError;

impl Hosted {
    pub(super) fn ar(
        net: Net,
        layers: BlockRange,
        total: u32,
        id: String,
        device: Device,
        max_tokens: u32,
    ) -> Hosted {
        let range = layers.first as usize - 1..layers.last as usize;
        Self::ar_stage(net, range, layers, total, id, device, max_tokens)
    }

    pub(super) fn ar_stage(
        net: Net,
        range: Range<usize>,
        layers: BlockRange,
        total: u32,
        id: String,
        device: Device,
        max_tokens: u32,
    ) -> Hosted {
        let kind = net
            ._vs
            .trainable_variables()
            .first()
            .map_or(Kind::Float, |t| t.kind());
        Hosted {
            info: ServerInfo {
                model_id: id,
                family: "ar".into(),
                blocks: layers,
                total,
                max_tokens,
                d_model: net.net.config().d_model as u32,
                window: net.net.config().window as u32,
                served: 0,
                busy_ms: 0.0,
                batches: 0,
                batched: 0,
            },
            role: Role::Ar {
                net: Box::new(net),
                layers: range,
                embed: layers.first == 1,
                head: layers.last == total,
                kind,
            },
            device,
        }
    }

    /// One AR step of this stage: embeds (first stage) or takes hidden states, runs its
    /// layers against `cache`, and hands on hidden states or samples the byte.
    /// `hidden` is the (rows, width) the frame declared for hidden states. `logprobs`
    /// (last stage): also the step's log-probabilities with that many alternatives
    /// (the peer's number: at most [`MAX_TOP_LOGPROBS`] are given whatever it asks).
    #[allow(clippy::too_many_arguments)]
    pub fn ar_step(
        &self,
        cache: &mut KvCache,
        payload: &ArPayload,
        hidden: Option<(u32, u32)>,
        sampling: &Sampling,
        seed: u64,
        output_index: u64,
        logprobs: Option<u32>,
    ) -> Result<ArStepOut, ServeError> {
        let Role::Ar {
            net,
            layers,
            embed,
            head,
            kind,
        } = &self.role
        else {
            return Err(bad("this server hosts diffusion blocks, not AR layers"));
        };
        let d = self.info.d_model as i64;
        let x = match (payload, embed) {
            (ArPayload::Tokens(t), true) => {
                if t.iter().any(|&v| v > MASK_TOKEN) {
                    return Err(bad("token ids must be bytes or MASK"));
                }
                let ids: Vec<i64> = t.iter().map(|&v| v as i64).collect();
                net.net.embed(
                    &Tensor::from_slice(&ids)
                        .view([1, -1])
                        .to_device(self.device),
                )
            }
            (ArPayload::Hidden(_), false) if hidden.is_none_or(|(_, w)| w as i64 != d) => {
                return Err(bad(format!(
                    "hidden states of width {:?}: this model's width is {d}",
                    hidden.map(|(_, w)| w)
                )))
            }
            (ArPayload::Hidden(h), false) => Tensor::from_slice(h)
                .view([1, -1, d])
                .to_device(self.device)
                .to_kind(*kind),
            (ArPayload::Tokens(_), false) => {
                return Err(bad("this AR stage takes hidden states, not bytes"))
            }
            (ArPayload::Hidden(_), true) => {
                return Err(bad("the first AR stage takes bytes, not hidden states"))
            }
        };
        let rows = x.size()[1];
        if rows == 0 {
            return Err(bad("an AR step needs at least one position"));
        }
        if cache.positions() + rows > self.info.max_tokens as i64 {
            return Err(bad(format!(
                "sequence would exceed this server's limit of {} positions",
                self.info.max_tokens
            )));
        }
        tch::no_grad(|| {
            let y = net.net.forward_layers_cached(layers.clone(), &x, cache);
            if *head {
                let logits = net
                    .net
                    .head_logits(&y.narrow(1, rows - 1, 1))
                    .view([1, -1])
                    .to_kind(Kind::Float);
                let mut rng = SampleRng::for_ar(seed, output_index);
                let byte = sampler::sample_bytes(&logits, &settings(sampling), &mut rng)[0];
                let scored = match logprobs {
                    None => None,
                    Some(n) => {
                        let lps: Vec<f32> = Vec::try_from(
                            logits
                                .log_softmax(-1, Kind::Float)
                                .to_device(Device::Cpu)
                                .view([-1]),
                        )
                        .map_err(|e| bad(format!("reading log-probabilities: {e}")))?;
                        Some(byte_logprobs(&lps, byte, n))
                    }
                };
                Ok(ArStepOut::Byte(byte, scored))
            } else {
                let values: Vec<f32> =
                    Vec::try_from(y.to_kind(Kind::Float).to_device(Device::Cpu).view([-1]))
                        .map_err(|e| bad(format!("reading hidden states: {e}")))?;
                Ok(ArStepOut::Hidden(values, rows as u32))
            }
        })
    }
}

/// The log-probabilities of `byte` and of the `n` most likely bytes (most likely first,
/// ties to the lower byte; `n` clamped to [`MAX_TOP_LOGPROBS`]) from a step's log-softmax
/// `lps` over the 256 bytes. Values are clamped to at most 0 (rounding never makes one
/// positive, but what goes on the wire must pass the peers' shape check).
pub fn byte_logprobs(lps: &[f32], byte: u8, n: u32) -> ByteLogprobs {
    let n = n.min(MAX_TOP_LOGPROBS) as usize;
    let at = |b: usize| lps.get(b).copied().unwrap_or(f32::NEG_INFINITY).min(0.0);
    let mut order: Vec<usize> = (0..lps.len().min(256)).collect();
    order.sort_by(|&a, &b| at(b).total_cmp(&at(a)).then(a.cmp(&b)));
    ByteLogprobs {
        logprob: at(byte as usize),
        top: order
            .into_iter()
            .take(n)
            .map(|b| (b as u8, at(b)))
            .collect(),
    }
}

#[cfg(test)]
mod logprob_tests {
    use super::*;

    #[test]
    fn the_top_bytes_come_most_likely_first_and_ties_by_byte() {
        let mut lps = vec![-10.0f32; 256];
        lps[b'a' as usize] = -0.5;
        lps[b'b' as usize] = -2.0;
        lps[b'c' as usize] = -2.0;
        lps[7] = -1.0;
        let s = byte_logprobs(&lps, b'c', 3);
        assert_eq!(s.logprob, -2.0);
        assert_eq!(s.top, vec![(b'a', -0.5), (7, -1.0), (b'b', -2.0)]);
        // A peer asking for more than the bound gets the bound, never an index past it.
        assert_eq!(byte_logprobs(&lps, 0, u32::MAX).top.len(), 5);
        assert_eq!(byte_logprobs(&lps, 0, 0).top, vec![]);
        assert!(s.check_shape().is_ok());
    }
}
