//! The request bodies of `/v1/completions` and `/v1/chat/completions`, and their check
//! into a [`Job`]: every field OpenAI defines is either honoured or refused with a 400
//! naming it, never silently ignored; unknown fields are refused too. (`logprobs` and
//! `top_logprobs` are checked in [`super::logprobs`].)
use blocktrain_protocol::frame::Sampling;
use serde::Deserialize;
use serde_json::{Number, Value};

use super::chat;
use super::error::ApiError;
use crate::client::{Plan, Request};

/// Choices per prompt (`n`) at most.
pub const MAX_N: u32 = 8;
/// Prompts in one request at most (a list `prompt`).
pub const MAX_PROMPTS: usize = 16;
/// Choices in one request at most (prompts x n), each one traversal or more.
pub const MAX_CHOICES: usize = 16;
/// Stop sequences at most (OpenAI's limit), and their longest, in bytes.
pub const MAX_STOPS: usize = 4;
const MAX_STOP_BYTES: usize = 256;
/// `/v1/completions` output bytes when `max_tokens` is not given (OpenAI's default).
const DEFAULT_COMPLETION_BYTES: usize = 16;
/// `/v1/chat/completions` output bytes when not given (less when the route has less room).
const DEFAULT_CHAT_BYTES: usize = 256;
/// The servers' bound on denoising steps per block.
const MAX_STEPS_PER_BLOCK: u32 = 4096;

/// Which endpoint a body came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/chat/completions`.
    Chat,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and no choices) before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields of both endpoints' bodies (each endpoint refuses the other's).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    model: Option<String>,
    prompt: Option<Value>,
    messages: Option<Vec<chat::Message>>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    n: Option<u32>,
    seed: Option<Number>,
    stop: Option<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    echo: Option<bool>,
    logprobs: Option<Value>,
    top_logprobs: Option<u32>,
    best_of: Option<u32>,
    suffix: Option<String>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    /// An end-user id for abuse tracking: accepted and not used.
    #[allow(dead_code)]
    user: Option<String>,
    /// BlockTrain extension: keep the k most likely bytes (0 = all).
    top_k: Option<u32>,
    /// BlockTrain extension: denoising steps per block.
    steps_per_block: Option<u32>,
}

/// A checked request: what to generate for every choice.
#[derive(Debug)]
pub struct Job {
    /// Prompts (the chat template's text for chat), bytes.
    pub prompts: Vec<Vec<u8>>,
    /// Choices per prompt; choice `p * n + j` is prompt `p`'s `j`-th.
    pub n: u32,
    /// Output bytes per choice.
    pub len: usize,
    /// Sampling settings of every choice.
    pub sampling: Sampling,
    /// Choice `j` of a prompt samples with `seed + j`.
    pub seed: u64,
    /// Stop sequences (chat: plus [`chat::TURN_STOP`]).
    pub stops: Vec<Vec<u8>>,
    /// Prepend the prompt to the text (completions only).
    pub echo: bool,
    /// Answer as server-sent events.
    pub stream: bool,
    /// With `stream`: a last chunk with `usage`.
    pub include_usage: bool,
    /// Log-probabilities of every output byte, with this many alternatives (AR only;
    /// see [`super::logprobs`]).
    pub logprobs: Option<u32>,
}

impl Job {
    /// The client request of choice `index` (prompt-major).
    pub fn request(&self, index: usize) -> Request {
        let n = self.n as usize;
        Request {
            prompt: self.prompts[index / n].clone(),
            len: self.len,
            sampling: self.sampling.clone(),
            seed: self.seed.wrapping_add((index % n) as u64),
        }
    }

    /// Choices in all.
    pub fn choices(&self) -> usize {
        self.prompts.len() * self.n as usize
    }
}

/// Checks `body` for `endpoint` against the route `plan`.
pub fn check(
    body: Body,
    endpoint: Endpoint,
    plan: &Plan,
    default_steps: u32,
) -> Result<Job, ApiError> {
    // A missing `model` is allowed (OpenAI requires it, but the route serves one model
    // and curl users should not need its 64-hex id); a wrong one is refused.
    if let Some(m) = &body.model {
        if *m != plan.model_id {
            return Err(ApiError::model_not_found(m));
        }
    }
    refuse_unsupported(&body, endpoint)?;
    let logprobs = super::logprobs::requested(
        endpoint,
        &plan.family,
        body.logprobs.as_ref(),
        body.top_logprobs,
        body.echo == Some(true),
    )?;
    let (prompts, mut stops) = match endpoint {
        Endpoint::Completions => (completion_prompts(body.prompt.as_ref())?, Vec::new()),
        Endpoint::Chat => {
            let messages = body
                .messages
                .as_deref()
                .ok_or_else(|| ApiError::invalid(Some("messages"), "`messages` is required"))?;
            (vec![chat::render(messages)?], vec![chat::TURN_STOP.into()])
        }
    };
    stops.splice(0..0, stop_sequences(body.stop.as_ref())?);
    let n = body.n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::invalid(
            Some("n"),
            format!("n must be 1..={MAX_N}, got {n}"),
        ));
    }
    if prompts.len() * n as usize > MAX_CHOICES {
        return Err(ApiError::invalid(
            Some("n"),
            format!(
                "{} prompts x n = {n} is more than the {MAX_CHOICES} choices a request may ask for",
                prompts.len()
            ),
        ));
    }
    let len = output_len(&body, endpoint, plan, &prompts)?;
    let temperature = body.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature must be 0..=2, got {temperature}"),
        ));
    }
    let top_p = body.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            Some("top_p"),
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = body.top_k.unwrap_or(0);
    if top_k > 256 {
        return Err(ApiError::invalid(
            Some("top_k"),
            format!("top_k must be 0..=256 (the bytes there are), got {top_k}"),
        ));
    }
    let steps_per_block = body.steps_per_block.unwrap_or(default_steps);
    if steps_per_block == 0 || steps_per_block > MAX_STEPS_PER_BLOCK {
        return Err(ApiError::invalid(
            Some("steps_per_block"),
            format!("steps_per_block must be 1..={MAX_STEPS_PER_BLOCK}, got {steps_per_block}"),
        ));
    }
    let seed = match &body.seed {
        Some(s) => s.as_u64().or(s.as_i64().map(|v| v as u64)).ok_or_else(|| {
            ApiError::invalid(Some("seed"), format!("seed must be an integer, got {s}"))
        })?,
        // Greedy is deterministic only with a fixed seed: the diffusion samplers' order
        // of unmasking positions is drawn from it even when each byte is the argmax.
        None if temperature == 0.0 => 0,
        None => rand::random(),
    };
    // OpenAI's temperature 0 means greedy: the most likely byte, at every position.
    let (temperature, top_k) = if temperature == 0.0 {
        (1.0, 1)
    } else {
        (temperature, top_k)
    };
    let stream = body.stream.unwrap_or(false);
    if body.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            Some("stream_options"),
            "stream_options is only allowed with stream: true",
        ));
    }
    Ok(Job {
        prompts,
        n,
        len,
        sampling: Sampling {
            steps_per_block,
            temperature,
            top_k,
            top_p,
            heun: false,
        },
        seed,
        stops,
        echo: body.echo.unwrap_or(false),
        stream,
        include_usage: body.stream_options.is_some_and(|o| o.include_usage),
        logprobs,
    })
}

/// Fields BlockTrain cannot honour (or that belong to the other endpoint), refused so a
/// client never gets silently different behaviour from what it asked.
fn refuse_unsupported(b: &Body, endpoint: Endpoint) -> Result<(), ApiError> {
    for (name, v) in [
        ("presence_penalty", b.presence_penalty),
        ("frequency_penalty", b.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::unsupported(
                name,
                format!("{name} must be 0 or left out: BlockTrain's samplers apply no repetition penalties"),
            ));
        }
    }
    if b.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::unsupported(
            "logit_bias",
            "logit_bias is not supported: the servers sample without per-byte biases",
        ));
    }
    if b.best_of.is_some_and(|k| k > b.n.unwrap_or(1)) {
        return Err(ApiError::unsupported(
            "best_of",
            "best_of greater than n is not supported: ranking choices needs their log-probabilities",
        ));
    }
    if b.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported(
            "suffix",
            "suffix (insertion) is not supported by this gateway",
        ));
    }
    let other = match endpoint {
        Endpoint::Completions => [
            ("messages", b.messages.is_some()),
            ("max_completion_tokens", b.max_completion_tokens.is_some()),
            ("top_logprobs", b.top_logprobs.is_some()),
        ],
        Endpoint::Chat => [
            ("prompt", b.prompt.is_some()),
            ("echo", b.echo.is_some()),
            ("suffix", b.suffix.is_some()),
        ],
    };
    if let Some((name, _)) = other.iter().find(|(_, given)| *given) {
        let (here, other) = match endpoint {
            Endpoint::Completions => ("/v1/completions", "/v1/chat/completions"),
            Endpoint::Chat => ("/v1/chat/completions", "/v1/completions"),
        };
        return Err(ApiError::invalid(
            Some(name),
            format!("`{name}` is a field of {other}, not of {here}"),
        ));
    }
    Ok(())
}

/// `prompt`: a string, a list of strings, or token ids (bytes: 0..=255) as a list or a
/// list of lists.
fn completion_prompts(prompt: Option<&Value>) -> Result<Vec<Vec<u8>>, ApiError> {
    let bad = |m: String| ApiError::invalid(Some("prompt"), m);
    let ids = |v: &[Value]| -> Result<Vec<u8>, ApiError> {
        v.iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u8::try_from(t).ok())
                    .ok_or_else(|| {
                        bad(format!(
                            "token id {t} is not a byte: this model's tokens are bytes 0..=255"
                        ))
                    })
            })
            .collect()
    };
    let prompts = match prompt {
        None => return Err(bad("`prompt` is required".into())),
        Some(Value::String(s)) => vec![s.clone().into_bytes()],
        Some(Value::Array(items)) if items.iter().all(Value::is_number) && !items.is_empty() => {
            vec![ids(items)?]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|p| match p {
                Value::String(s) => Ok(s.clone().into_bytes()),
                Value::Array(t) => ids(t),
                _ => Err(bad(
                    "a prompt list holds strings, or lists of token ids".into()
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(bad(
                "prompt must be a string, a list of strings, or token ids".into(),
            ))
        }
    };
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(bad(format!(
            "a prompt list must hold 1..={MAX_PROMPTS} prompts, got {}",
            prompts.len()
        )));
    }
    Ok(prompts)
}

/// `stop`: a string or a list of up to [`MAX_STOPS`].
fn stop_sequences(stop: Option<&Value>) -> Result<Vec<Vec<u8>>, ApiError> {
    let bad = |m: String| ApiError::invalid(Some("stop"), m);
    let list: Vec<&Value> = match stop {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().collect(),
        Some(one) => vec![one],
    };
    if list.len() > MAX_STOPS {
        return Err(bad(format!(
            "at most {MAX_STOPS} stop sequences, got {}",
            list.len()
        )));
    }
    list.into_iter()
        .map(|s| match s.as_str() {
            Some(s) if !s.is_empty() && s.len() <= MAX_STOP_BYTES => Ok(s.as_bytes().to_vec()),
            Some(s) => Err(bad(format!(
                "a stop sequence must be 1..={MAX_STOP_BYTES} bytes, got {}",
                s.len()
            ))),
            None => Err(bad("stop must be a string or a list of strings".into())),
        })
        .collect()
}

/// Output bytes per choice: `max_tokens` (chat: or `max_completion_tokens`), bounded by
/// what the route's servers take.
fn output_len(
    body: &Body,
    endpoint: Endpoint,
    plan: &Plan,
    prompts: &[Vec<u8>],
) -> Result<usize, ApiError> {
    let limit = plan.max_tokens as usize;
    // Diffusion denoises prompt + output as one sequence; the AR pipeline keeps its
    // context inside the model's window however long the prompt is.
    let longest = if plan.family == "ar" {
        0
    } else {
        prompts.iter().map(Vec::len).max().unwrap_or(0)
    };
    let room = limit.saturating_sub(longest);
    let (param, asked) = match (body.max_completion_tokens, body.max_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(
                Some("max_completion_tokens"),
                "max_tokens and max_completion_tokens disagree: give one",
            ))
        }
        (Some(a), _) => ("max_completion_tokens", Some(a as usize)),
        (None, b) => ("max_tokens", b.map(|b| b as usize)),
    };
    let len = asked.unwrap_or(match endpoint {
        Endpoint::Completions => DEFAULT_COMPLETION_BYTES,
        Endpoint::Chat => DEFAULT_CHAT_BYTES.min(room),
    });
    if len == 0 {
        let why = if asked.is_some() {
            format!("{param} must be at least 1")
        } else {
            format!("the prompt ({longest} bytes) leaves no room: the route's servers take {limit} positions")
        };
        return Err(ApiError::invalid(Some(param), why));
    }
    if len > room {
        let prompt = if longest > 0 {
            format!("the prompt ({longest} bytes) + ")
        } else {
            String::new()
        };
        return Err(ApiError::invalid(
            Some(param),
            format!(
                "{prompt}{param} = {len} is more than the {limit} positions the route's servers take (tokens are bytes)"
            ),
        ));
    }
    Ok(len)
}
