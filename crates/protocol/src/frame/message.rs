//! What frames carry: the metadata structs and the decoded [`Message`].
use serde::{Deserialize, Serialize};

use super::greeting::{Greeting, Hello};
use super::route::{BlockRange, Stage};

/// Token id of a still-masked position (the model's MASK id).
pub const MASK_TOKEN: u16 = 256;

/// Sampling settings a request carries to every hop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Denoising steps each block takes over its interval.
    pub steps_per_block: u32,
    /// Softmax temperature (> 0).
    pub temperature: f64,
    /// Keep the k most likely bytes (0 = all).
    pub top_k: u32,
    /// Nucleus sampling: the most likely bytes holding this much probability (1 = all).
    #[serde(default = "all_of_it")]
    pub top_p: f64,
    /// Embedding diffusion: Heun steps instead of Euler's.
    #[serde(default)]
    pub heun: bool,
}

fn all_of_it() -> f64 {
    1.0
}

/// What one server did for a request, reported back to the client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HopStat {
    /// Blocks it ran.
    pub blocks: BlockRange,
    /// Its name (the address it was reached at).
    pub server: String,
    /// Milliseconds of local compute.
    pub compute_ms: f64,
    /// Replicas of the NEXT stage this server gave up on before one answered.
    pub failovers: u32,
    /// Bytes of the body it sent on down the stack (0 for the last stage): tokens and mask
    /// bitmap, plus the f16 latent or hidden states; the header and JSON are not counted.
    #[serde(default)]
    pub bytes_out: u64,
}

/// A server's description of itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Identifies the model (all servers of one route must agree).
    pub model_id: String,
    /// `block` (diffusion blocks) or `ar` (layers of the autoregressive baseline).
    pub family: String,
    /// Blocks (or AR layers) this server hosts.
    pub blocks: BlockRange,
    /// Blocks (or layers) in the whole model.
    pub total: u32,
    /// Longest token sequence (prompt + output) it accepts.
    pub max_tokens: u32,
    /// Width of the residual stream (AR hidden states).
    pub d_model: u32,
    /// Positions the model was trained on (the AR pipeline keeps its context within it).
    pub window: u32,
    /// Passes this server has computed since it started: one per diffusion request that
    /// crossed it, one per AR step. Counted by the server, so a client or test can check
    /// how many traversals a generation really made.
    #[serde(default)]
    pub served: u64,
    /// Milliseconds those passes took, each from its admission to its result (the time
    /// its hop report gives as compute): with `served`, the server's mean time per pass,
    /// which clients rank replicas by.
    #[serde(default)]
    pub busy_ms: f64,
    /// Diffusion batches this server has computed: one per run of its blocks over the
    /// requests computed together (a request alone is a batch of one).
    #[serde(default)]
    pub batches: u64,
    /// Diffusion requests those batches computed (`batched / batches`: the mean batch).
    #[serde(default)]
    pub batched: u64,
}

/// Metadata of a [`Message::Denoise`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenoiseMeta {
    /// Chosen by the client; echoed in replies.
    pub request_id: u64,
    /// Model every hop must host.
    pub model_id: String,
    /// Sampling settings.
    pub sampling: Sampling,
    /// Seed: block b samples from its own stream of it, so the output does not depend
    /// on which replica ran which block.
    pub seed: u64,
    /// The whole route, in traversal order (highest blocks first).
    pub route: Vec<Stage>,
    /// Index in `route` of the stage receiving this frame.
    pub hop: u32,
    /// What the stages before this one did.
    pub hops: Vec<HopStat>,
}

/// The embedding family's state between stages: the latent z (positions x width,
/// row-major) at noise level `sigma`.
#[derive(Clone, Debug, PartialEq)]
pub struct LatentState {
    /// Embedding width.
    pub width: u32,
    /// Noise level of z.
    pub sigma: f64,
    /// The values, f32 here, f16 on the wire.
    pub values: Vec<f32>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct LatentMeta {
    #[serde(flatten)]
    pub(super) denoise: DenoiseMeta,
    pub(super) width: u32,
    pub(super) sigma: f64,
}

/// Metadata of a [`Message::Result`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultMeta {
    /// The request's id.
    pub request_id: u64,
    /// Every stage's report, in traversal order.
    pub hops: Vec<HopStat>,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is wrong (retrying elsewhere will not help).
    BadRequest,
    /// Servers disagree about the model, or a server does not host what the route says.
    Mismatch,
    /// No replica of a stage answered in time.
    Unavailable,
    /// The server failed while computing.
    Internal,
    /// The server is at a capacity limit (connections, requests queued, request rate):
    /// a transient refusal, so callers try the next replica. The message names the limit.
    Busy,
    /// The request asks for more than this server computes for one request (tokens x
    /// steps): another replica with the same settings would refuse it too.
    LimitExceeded,
    /// The connection is not authenticated (no, bad or replayed `Hello`) or its key is
    /// not admitted.
    Unauthorized,
    /// The server will not forward to a stage of the route: the address is not a
    /// verified server of this model (or not a configured peer).
    Refused,
}

/// Metadata of a [`Message::Error`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HopError {
    /// The request's id (0 if it never parsed).
    pub request_id: u64,
    /// What kind of failure.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// The blocks concerned, when known.
    pub blocks: Option<BlockRange>,
}

/// What an AR session fixes once: sent with its first step only, so later steps carry
/// little more than the hidden states (a lean pipeline, as a fair baseline should be).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArSetup {
    /// Model every hop must host.
    pub model_id: String,
    /// Sampling settings (used by the last stage).
    pub sampling: Sampling,
    /// Seed of the sampling streams.
    pub seed: u64,
    /// Stages in traversal order (first holds the embedding, last the head).
    pub route: Vec<Stage>,
    /// Index in `route` of the receiver.
    pub hop: u32,
    /// Log-probabilities wanted with every byte: None, none (what clients before them
    /// send, and servers before them ignore); `Some(n)`: the sampled byte's and the `n`
    /// most likely bytes' ([`ByteLogprobs`]). Servers refuse `n` over
    /// [`MAX_TOP_LOGPROBS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
}

/// Most alternatives an AR step reports per byte ([`ArSetup::logprobs`]): OpenAI's
/// legacy completions allow 5.
pub const MAX_TOP_LOGPROBS: u32 = 5;

/// The model's log-probabilities at one AR step: natural logs of the softmax of the
/// last stage's logits for the next byte given the context, before the request's
/// temperature, `top_k` and `top_p` (the model's own distribution, as OpenAI reports
/// it; the same whatever the sampling settings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ByteLogprobs {
    /// The sampled byte's.
    pub logprob: f32,
    /// The most likely bytes and theirs, most likely first (ties: the lower byte first),
    /// as many as the setup asked for.
    pub top: Vec<(u8, f32)>,
}

impl ByteLogprobs {
    /// What a decoder accepts from a peer: finite log-probabilities (at most 0), at most
    /// [`MAX_TOP_LOGPROBS`] alternatives, distinct and in order.
    pub fn check_shape(&self) -> std::result::Result<(), String> {
        let fine = |lp: f32| lp.is_finite() && lp <= 0.0;
        if !fine(self.logprob) {
            return Err(format!(
                "log-probability {} is not a finite value <= 0",
                self.logprob
            ));
        }
        if self.top.len() > MAX_TOP_LOGPROBS as usize {
            return Err(format!(
                "{} alternatives: at most {MAX_TOP_LOGPROBS}",
                self.top.len()
            ));
        }
        if let Some((b, lp)) = self.top.iter().find(|(_, lp)| !fine(*lp)) {
            return Err(format!(
                "byte {b}'s log-probability {lp} is not a finite value <= 0"
            ));
        }
        for (i, (b, lp)) in self.top.iter().enumerate() {
            if self.top[..i].iter().any(|(a, _)| a == b) {
                return Err(format!("byte {b} is listed twice among the alternatives"));
            }
            if i > 0 && self.top[i - 1].1 < *lp {
                return Err("the alternatives are not most likely first".into());
            }
        }
        Ok(())
    }
}

/// Metadata of a [`Message::ArStep`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArStepMeta {
    /// Session (one generation); the KV caches live as long as its connections.
    pub session: u64,
    /// Index of the output byte this step samples (0 for the first).
    pub output_index: u64,
    /// Hidden states: (rows, d_model) in the body as f16; None: token ids (first stage).
    pub hidden: Option<(u32, u32)>,
    /// The session's settings: on the first step of a connection, None after.
    pub setup: Option<ArSetup>,
}

/// Metadata of a [`Message::ArOutput`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArOutput {
    /// The session.
    pub session: u64,
    /// The sampled byte.
    pub byte: u8,
    /// Every stage's report for this step.
    pub hops: Vec<HopStat>,
    /// This step's log-probabilities, when the session's setup asked for them (absent
    /// otherwise, so clients before them read the frame as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<ByteLogprobs>,
}

/// Body of an [`Message::ArStep`].
#[derive(Clone, Debug, PartialEq)]
pub enum ArPayload {
    /// New token ids (first stage): bytes or [`MASK_TOKEN`].
    Tokens(Vec<u16>),
    /// Hidden states of the new positions, row-major (rows, d).
    Hidden(Vec<f32>),
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// The first frame of every connection, from the server (before it reads anything).
    Greeting(Greeting),
    /// The client's authentication for this connection (answers the greeting).
    Hello(Hello),
    /// "What do you host?"
    Info,
    /// The answer.
    ServerInfo(ServerInfo),
    /// A diffusion request and the current token sequence (bytes or [`MASK_TOKEN`]).
    Denoise(DenoiseMeta, Vec<u16>),
    /// Still working.
    Keepalive,
    /// The finished sequence (every position a byte).
    Result(ResultMeta, Vec<u8>),
    /// A failure.
    Error(HopError),
    /// One autoregressive step.
    ArStep(ArStepMeta, ArPayload),
    /// One sampled byte.
    ArOutput(ArOutput),
    /// An embedding-diffusion request and its current tokens (prompt bytes, MASK at the
    /// output) with the latent a previous stage handed on.
    Latent(DenoiseMeta, Vec<u16>, LatentState),
}
