//! `logprobs`: what a request asks for, and the log-probabilities of a choice's bytes in
//! OpenAI's two shapes.
//!
//! Only the AR family has them: its last stage computes the distribution of the next
//! byte at every step, and reports the sampled byte's log-probability and the most
//! likely bytes' (at most [`MAX_TOP_LOGPROBS`]). They are the model's own distribution,
//! the log-softmax of its logits before `temperature`, `top_k` and `top_p` (as OpenAI
//! reports them), so they do not change with the sampling settings, and greedy output
//! (`temperature: 0`) is always the first alternative. A diffusion traversal unmasks
//! bytes in parallel over many denoising steps and gives no per-byte likelihood, so the
//! diffusion families refuse `logprobs` with a 400 saying so.
//!
//! A token is one byte. ASCII bytes are their own character; any other byte alone is not
//! UTF-8 and is written as OpenAI writes such tokens, `bytes:\xNN` (two lowercase hex
//! digits), so every byte has its own string (`top_logprobs` keys never collide). The
//! choice's `text` still joins a multi-byte character's bytes into that character (see
//! [`super::text`]); `text_offset` gives, per byte, where its character starts in
//! `text`, counted in characters (code points, as Python indexes a `str`).
//!
//! - `/v1/completions`, `logprobs: N` (0..=5): `{"tokens", "token_logprobs",
//!   "top_logprobs", "text_offset"}`; each `top_logprobs` entry maps the N most likely
//!   bytes, and the sampled one (OpenAI: "up to logprobs + 1 elements"), to theirs.
//!   With `echo`, refused: the prompt's bytes are never scored (the last stage sees
//!   hidden states, not bytes, and the context may be cut to the model's window).
//! - `/v1/chat/completions`, `logprobs: true` and `top_logprobs: N` (0..=5; OpenAI
//!   allows 20): `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}],
//!   "refusal": null}`, `top_logprobs` the N most likely bytes, most likely first.
//!
//! Streamed chunks carry the log-probabilities of the bytes of their own text.
use blocktrain_protocol::frame::{ByteLogprobs, MAX_TOP_LOGPROBS};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::request::Endpoint;

/// What a body asks for: None, no log-probabilities; `Some(n)`: them, with the `n` most
/// likely bytes per token. Refuses them for a family without, and values out of range.
pub fn requested(
    endpoint: Endpoint,
    family: &str,
    logprobs: Option<&Value>,
    top_logprobs: Option<u32>,
    echo: bool,
) -> Result<Option<u32>, ApiError> {
    let wants = match endpoint {
        Endpoint::Completions => logprobs.is_some_and(|v| !v.is_null()),
        Endpoint::Chat => {
            logprobs.is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
                || top_logprobs.is_some()
        }
    };
    if !wants {
        return Ok(None);
    }
    if family != "ar" {
        return Err(ApiError::unsupported(
            "logprobs",
            format!(
                "logprobs are not available for this {family} model: a diffusion traversal unmasks bytes in parallel over many denoising steps, so it gives no per-byte likelihood (only the AR family's models report them)"
            ),
        ));
    }
    let most = MAX_TOP_LOGPROBS;
    match endpoint {
        Endpoint::Completions => {
            let v = logprobs.unwrap_or(&Value::Null);
            let n = v
                .as_u64()
                .filter(|&n| n <= most as u64)
                .ok_or_else(|| {
                    ApiError::invalid(
                        Some("logprobs"),
                        format!("logprobs must be an integer 0..={most} (the most likely tokens to list with each token), got {}", super::error::clip(&v.to_string())),
                    )
                })?;
            if echo {
                return Err(ApiError::unsupported(
                    "echo",
                    "echo with logprobs is not supported: the prompt's bytes are not scored (the AR pipeline's last stage sees hidden states, not the prompt's bytes, and the context may be cut to the model's window); leave out echo or logprobs",
                ));
            }
            Ok(Some(n as u32))
        }
        Endpoint::Chat => {
            match logprobs {
                Some(Value::Bool(true)) => {}
                None | Some(Value::Null) | Some(Value::Bool(false)) => {
                    return Err(ApiError::invalid(
                        Some("top_logprobs"),
                        "top_logprobs needs logprobs: true",
                    ))
                }
                Some(other) => {
                    return Err(ApiError::invalid(
                        Some("logprobs"),
                        format!(
                            "logprobs must be true or false, got {}",
                            super::error::clip(&other.to_string())
                        ),
                    ))
                }
            }
            let n = top_logprobs.unwrap_or(0);
            if n > most {
                return Err(ApiError::invalid(
                    Some("top_logprobs"),
                    format!("top_logprobs must be 0..={most}, got {n}: the AR servers report at most {most} alternatives per byte"),
                ));
            }
            Ok(Some(n))
        }
    }
}

/// A byte as a token: ASCII as itself, any other byte as `bytes:\xNN`.
pub fn token(b: u8) -> String {
    if b.is_ascii() {
        char::from(b).to_string()
    } else {
        format!("bytes:\\x{b:02x}")
    }
}

/// Where each byte's character starts in the lossy UTF-8 text of `bytes` (one U+FFFD
/// per maximal invalid sequence, as `String::from_utf8_lossy` writes it), in code
/// points, counting from `base`.
pub fn char_offsets(bytes: &[u8], base: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = base;
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            out.extend(std::iter::repeat_n(at, c.len_utf8()));
            at += 1;
        }
        if !chunk.invalid().is_empty() {
            out.extend(std::iter::repeat_n(at, chunk.invalid().len()));
            at += 1;
        }
    }
    out
}

/// An f32 as the JSON number of its shortest decimal (`-0.1`, not `-0.10000000149...`).
fn num(v: f32) -> Value {
    v.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// The log-probabilities of a piece of a choice's text: its bytes, theirs, and where
/// each byte's character starts in the choice's text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scored {
    /// The piece's bytes.
    pub bytes: Vec<u8>,
    /// One per byte.
    pub logprobs: Vec<ByteLogprobs>,
    /// One per byte: [`char_offsets`] in the whole text.
    pub offsets: Vec<usize>,
}

impl Scored {
    /// The `logprobs` of a choice (or chunk) of `endpoint`.
    pub fn render(&self, endpoint: Endpoint) -> Value {
        match endpoint {
            Endpoint::Completions => self.legacy(),
            Endpoint::Chat => self.chat(),
        }
    }

    /// `/v1/completions`' shape.
    fn legacy(&self) -> Value {
        let scored = self.bytes.iter().zip(&self.logprobs);
        let top: Vec<Value> = scored
            .clone()
            .map(|(&b, lp)| {
                let mut m: Map<String, Value> =
                    lp.top.iter().map(|&(t, v)| (token(t), num(v))).collect();
                m.entry(token(b)).or_insert_with(|| num(lp.logprob));
                Value::Object(m)
            })
            .collect();
        json!({
            "tokens": scored.clone().map(|(&b, _)| token(b)).collect::<Vec<_>>(),
            "token_logprobs": scored.map(|(_, lp)| num(lp.logprob)).collect::<Vec<_>>(),
            "top_logprobs": top,
            "text_offset": self.offsets.iter().take(self.logprobs.len()).collect::<Vec<_>>(),
        })
    }

    /// `/v1/chat/completions`' shape.
    fn chat(&self) -> Value {
        let entry = |b: u8, v: f32| json!({"token": token(b), "logprob": num(v), "bytes": [b]});
        let content: Vec<Value> = self
            .bytes
            .iter()
            .zip(&self.logprobs)
            .map(|(&b, lp)| {
                let mut e = entry(b, lp.logprob);
                e["top_logprobs"] = lp.top.iter().map(|&(t, v)| entry(t, v)).collect();
                e
            })
            .collect();
        json!({"content": content, "refusal": null})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_has_its_own_token_string() {
        let all: std::collections::BTreeSet<String> = (0..=255u8).map(token).collect();
        assert_eq!(all.len(), 256);
        assert_eq!(token(b'a'), "a");
        assert_eq!(token(b'\n'), "\n");
        assert_eq!(token(0xC3), "bytes:\\xc3");
    }

    #[test]
    fn offsets_point_at_each_bytes_character_in_the_lossy_text() {
        let bytes = "aé€\n"
            .bytes()
            .chain([0xFF, b'z', 0xE2, 0x82])
            .collect::<Vec<_>>();
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(text, "aé€\n\u{FFFD}z\u{FFFD}");
        assert_eq!(char_offsets(&bytes, 0), [0, 1, 1, 2, 2, 2, 3, 4, 5, 6, 6]);
        let chars: Vec<char> = text.chars().collect();
        for (b, at) in bytes.iter().zip(char_offsets(&bytes, 0)) {
            if b.is_ascii() {
                assert_eq!(chars[at], char::from(*b));
            }
        }
        // Pieces that split no character give the offsets of the whole.
        let (head, tail) = bytes.split_at(3);
        let pieced = [char_offsets(head, 0), char_offsets(tail, 2)].concat();
        assert_eq!(pieced, char_offsets(&bytes, 0));
    }

    #[test]
    fn both_shapes_list_every_byte_and_the_legacy_one_adds_the_sampled_byte() {
        let lp = |logprob, top: &[(u8, f32)]| ByteLogprobs {
            logprob,
            top: top.to_vec(),
        };
        let s = Scored {
            bytes: vec![b'h', 0xC3],
            logprobs: vec![
                lp(-0.1, &[(b'h', -0.1), (b'a', -2.5)]),
                lp(-3.0, &[(b'e', -0.2), (b'i', -1.5)]),
            ],
            offsets: vec![4, 5],
        };
        let v = s.render(Endpoint::Completions);
        assert_eq!(v["tokens"], json!(["h", "bytes:\\xc3"]));
        assert_eq!(v["token_logprobs"], json!([-0.1, -3.0]));
        assert_eq!(v["top_logprobs"][0], json!({"h": -0.1, "a": -2.5}));
        assert_eq!(
            v["top_logprobs"][1],
            json!({"e": -0.2, "i": -1.5, "bytes:\\xc3": -3.0})
        );
        assert_eq!(v["text_offset"], json!([4, 5]));
        let v = s.render(Endpoint::Chat);
        let c = &v["content"];
        assert_eq!(c[1]["token"], "bytes:\\xc3");
        assert_eq!(c[1]["bytes"], json!([0xC3]));
        assert_eq!(c[1]["logprob"], json!(-3.0));
        assert_eq!(
            c[1]["top_logprobs"],
            json!([
                {"token": "e", "logprob": -0.2, "bytes": [101]},
                {"token": "i", "logprob": -1.5, "bytes": [105]},
            ])
        );
        assert_eq!(v["refusal"], Value::Null);
    }
}
