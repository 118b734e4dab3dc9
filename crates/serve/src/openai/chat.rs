//! The chat template: a byte model has no chat tokens, so `/v1/chat/completions` turns
//! its messages into plain text and completes it.
//!
//! ```text
//! System: {system or developer message}
//! User: {user message}
//! Assistant: {assistant message}
//! ...
//! Assistant:
//! ```
//!
//! One line prefix per message, each message ended by `\n`, then `Assistant:` for the
//! model to continue (its reply usually starts with a space, left as sampled). The reply
//! also stops at [`TURN_STOP`], a new user turn, besides the request's own `stop`.
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;

/// Where the assistant's reply ends when the model starts the user's next turn.
pub const TURN_STOP: &str = "\nUser:";

/// Messages in one request at most.
pub const MAX_MESSAGES: usize = 256;

/// One chat message as OpenAI clients send it.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// A string, or a list of `{"type": "text", "text": ...}` parts.
    #[serde(default)]
    pub content: Value,
    /// A participant's name (accepted, not part of the template).
    #[serde(default)]
    #[allow(dead_code)]
    pub name: Option<String>,
}

/// The prompt for `messages`, by the template above.
pub fn render(messages: &[Message]) -> Result<Vec<u8>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "`messages` must hold at least one message",
        ));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(
            Some("messages"),
            format!(
                "{} messages is more than the {MAX_MESSAGES} a request may hold",
                messages.len()
            ),
        ));
    }
    let mut prompt = String::new();
    for (i, m) in messages.iter().enumerate() {
        let speaker = match m.role.as_str() {
            "system" | "developer" => "System",
            "user" => "User",
            "assistant" => "Assistant",
            other => {
                return Err(ApiError::invalid(
                    Some(&format!("messages[{i}].role")),
                    format!(
                        "role `{}` is not supported: a byte model has no tool calls; use system, developer, user or assistant",
                        super::error::clip(other)
                    ),
                ))
            }
        };
        prompt.push_str(speaker);
        prompt.push_str(": ");
        prompt.push_str(&content_text(&m.content, i)?);
        prompt.push('\n');
    }
    prompt.push_str("Assistant:");
    Ok(prompt.into_bytes())
}

/// A message's text: a string, or its text parts concatenated.
fn content_text(content: &Value, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    let bad = |m: &str| ApiError::invalid(Some(&param), m.to_string());
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (Some("text"), _) => return Err(bad("a text part needs a string `text`")),
                    _ => {
                        return Err(bad(
                            "only text parts ({\"type\": \"text\", \"text\": ...}) are supported: the model reads bytes of text",
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(bad("content must be a string or a list of text parts")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: Value) -> Message {
        Message {
            role: role.into(),
            content,
            name: None,
        }
    }

    #[test]
    fn messages_render_by_the_template() {
        let p = render(&[
            msg("system", "Be brief.".into()),
            msg("user", serde_json::json!([{"type": "text", "text": "Hi"}])),
            msg("assistant", "Hello.".into()),
            msg("user", "Bye?".into()),
        ])
        .unwrap();
        assert_eq!(
            String::from_utf8(p).unwrap(),
            "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye?\nAssistant:"
        );
    }

    #[test]
    fn tool_roles_images_and_empty_lists_are_refused_naming_the_field() {
        let e = render(&[msg("tool", "x".into())]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let image = serde_json::json!([{"type": "image_url", "image_url": {"url": "x"}}]);
        let e = render(&[msg("user", "a".into()), msg("user", image)]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[1].content"));
        assert!(render(&[]).is_err());
    }
}
