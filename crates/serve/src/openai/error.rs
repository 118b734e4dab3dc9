//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every
//! refusal the gateway makes, and the JSON body extractor that maps syntax errors, wrong
//! field types, oversized bodies and wrong content types into that shape (axum's own
//! `Json` rejection answers in plain text, which OpenAI clients cannot parse).
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::ServeError;

/// A refusal, answered as OpenAI's error object.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong and what to do about it.
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// OpenAI's machine-readable `code`, if one applies.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about the request, naming the field at fault when there is one.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// A 400 for a field BlockTrain understands but cannot honour (`code:
    /// unsupported_parameter`), so a client never gets silently different behaviour.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            code: Some("unsupported_parameter"),
            ..Self::invalid(Some(param), message)
        }
    }

    /// 404 for a model this route does not serve, as OpenAI answers it.
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..Self::invalid(
                Some("model"),
                format!(
                    "The model `{}` does not exist: this gateway serves one model (GET /v1/models)",
                    clip(model)
                ),
            )
        }
    }

    /// Any other status, without a field or code.
    pub fn status(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// A failed generation: the servers refusing the request is the caller's to fix
    /// (400), anything else is the route's (502).
    pub fn from_serve(e: ServeError) -> Self {
        match e {
            ServeError::Config(m) | ServeError::Rejected(m) => Self::invalid(None, m),
            other => Self::status(
                StatusCode::BAD_GATEWAY,
                "server_error",
                format!("the route of block servers failed: {other}"),
            ),
        }
    }

    /// The `{"error": {...}}` object.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// Echoes of client input in messages are cut to this many chars.
const ECHO_CHARS: usize = 64;

/// `s` cut for quoting back in an error message (a hostile client's 1 MB model name is
/// not worth returning).
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(ECHO_CHARS) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// A JSON request body, parsed into `T` with errors in OpenAI's shape naming the field
/// (`param`) at fault. The size limit is axum's `DefaultBodyLimit` on the router.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // A body not declared as JSON is refused, so a browser's "simple" cross-origin
        // request (a form post, or a fetch of a Blob with no type: both skip the CORS
        // preflight) cannot start generations.
        {
            let ct = req.headers().get(header::CONTENT_TYPE);
            let declared = ct.map_or("(none)", |ct| ct.to_str().unwrap_or(""));
            let essence = declared.split(';').next().unwrap_or("");
            let essence = essence.trim().to_ascii_lowercase();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(ApiError::status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_request_error",
                    format!(
                        "the request body must be JSON (Content-Type: application/json), got {}",
                        clip(&essence)
                    ),
                ));
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            let message = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "the request body is larger than this gateway's limit of {} bytes",
                    super::MAX_BODY_BYTES
                )
            } else {
                format!("the request body could not be read: {}", r.body_text())
            };
            ApiError::status(r.status(), "invalid_request_error", message)
        })?;
        parse(&bytes).map(JsonBody)
    }
}

/// Parses a JSON body, naming the field of a type error (`messages[0].content`).
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_data() {
            let param = (path != ".").then_some(path.as_str());
            let at = param.map_or(String::new(), |p| format!(" in `{p}`"));
            ApiError::invalid(param, format!("invalid request{at}: {inner}"))
        } else {
            ApiError::invalid(None, format!("the request body is not valid JSON: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid JSON: {e}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct T {
        n: Option<u32>,
        inner: Option<Vec<Inner>>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Inner {
        x: String,
    }

    #[test]
    fn type_errors_name_the_field_and_syntax_errors_say_json() {
        let e = parse::<T>(br#"{"n": "two"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"), "{e:?}");
        assert!(e.message.contains("invalid type"), "{e:?}");
        let e = parse::<T>(br#"{"inner": [{"x": 1}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("inner[0].x"), "{e:?}");
        let e = parse::<T>(br#"{"n": 1"#).unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{e:?}");
        assert_eq!(e.param, None);
        let e = parse::<T>(br#"{"n": 1} trailing"#).unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{e:?}");
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn quoted_input_is_clipped() {
        let long = "m".repeat(10_000);
        assert!(ApiError::model_not_found(&long).message.len() < 200);
        assert_eq!(clip("gpt-4"), "gpt-4");
    }
}
