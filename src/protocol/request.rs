//! Decoding and validation of inbound inference and cancel messages.
//!
//! Nothing that arrives on a subject is trusted. [`decode_request`] checks size, JSON nesting,
//! UTF-8, every field's type and range, and returns either a [`ValidRequest`] the worker can act
//! on or a [`Rejection`] that carries the request id when it could be read (so the worker can
//! answer on `response.{requestId}`) and a [`RequestError`] naming the field, the value and the
//! limit. An unpaired surrogate escape in a string reads as U+FFFD, the replacement character.
//! When the body does not parse, the id comes from a bounded, lenient scan of its top level
//! (the passes over raw bytes are in `protocol::body`).

use std::time::Duration;

use serde_json::{Map, Value};

use super::body::{BodyError, check_depth, check_utf8, repair_surrogates, scan_request_id};
use super::subject::{TokenError, check_token};
use super::{ErrorCode, Priority};
use crate::limits::{
    JSON_DEPTH_MAX, MAX_TOKENS_MAX, MODEL_ID_BYTES_MAX, NATS_PAYLOAD_BYTES_MAX, PROMPT_BYTES_MAX,
    REQUEST_TIMEOUT_MAX,
};

/// The bounds an inbound request is checked against. Each is at most its constant in
/// [`crate::limits`]; configuration may lower them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Largest message accepted, bytes.
    pub payload_bytes_max: usize,
    /// Largest prompt accepted, UTF-8 bytes.
    pub prompt_bytes_max: usize,
    /// Largest `maxTokens` accepted.
    pub max_tokens_max: u32,
    /// Longest `timeoutMs` accepted.
    pub timeout_max: Duration,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            payload_bytes_max: NATS_PAYLOAD_BYTES_MAX,
            prompt_bytes_max: PROMPT_BYTES_MAX,
            max_tokens_max: MAX_TOKENS_MAX,
            timeout_max: REQUEST_TIMEOUT_MAX,
        }
    }
}

/// An inference request that passed every check.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidRequest {
    /// Safe as one subject token.
    pub request_id: String,
    /// Non-empty, within [`MODEL_ID_BYTES_MAX`], charset-checked. Whether the worker serves it
    /// is decided later.
    pub model_id: String,
    /// Within the prompt limit.
    pub prompt: String,
    /// In `1..=max_tokens_max` when present.
    pub max_tokens: Option<u32>,
    /// In `0..=2` when present.
    pub temperature: Option<f64>,
    /// In `(0, 1]` when present.
    pub top_p: Option<f64>,
    /// Opaque session id, bounded in length.
    pub session_id: Option<String>,
    /// The request's own priority, or the default derived from `stream`.
    pub priority: Priority,
    /// The request's own deadline from receipt, when it set `timeoutMs`.
    pub timeout: Option<Duration>,
}

/// A message that could not be accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// The request id, when it could be read and is safe to use in a subject.
    pub request_id: Option<String>,
    /// What was wrong.
    pub error: RequestError,
}

impl Rejection {
    /// The wire code for this rejection.
    pub fn code(&self) -> ErrorCode {
        self.error.code()
    }
}

/// What was wrong with an inbound message.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// The message exceeds the payload limit.
    #[error("message is {len} bytes, limit {limit}")]
    PayloadTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The prompt exceeds the prompt limit.
    #[error("field \"prompt\" is {len} bytes, limit {limit}")]
    PromptTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The message is not JSON.
    #[error("message is not valid JSON: {reason}")]
    NotJson {
        /// The parser's words.
        reason: String,
    },
    /// The message is not UTF-8.
    #[error("invalid UTF-8 in the body at byte {offset}")]
    InvalidUtf8 {
        /// Offset of the first byte that is not UTF-8, from 0.
        offset: usize,
    },
    /// The message nests deeper than allowed.
    #[error("message nests deeper than {JSON_DEPTH_MAX} levels")]
    TooDeep,
    /// The message is JSON but not an object.
    #[error("message is not a JSON object")]
    NotObject,
    /// A required field is absent.
    #[error("field \"{field}\" is missing")]
    Missing {
        /// The field.
        field: &'static str,
    },
    /// A field has the wrong JSON type.
    #[error("field \"{field}\" is {found}, expected {expected}")]
    WrongType {
        /// The field.
        field: &'static str,
        /// What was expected.
        expected: &'static str,
        /// What was found (the JSON type and a short rendering of the value).
        found: String,
    },
    /// A number is out of its range.
    #[error("field \"{field}\" is {value}, must be {range}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value given.
        value: String,
        /// The accepted range.
        range: String,
    },
    /// An id cannot be used as a subject token.
    #[error("field \"{field}\" {reason}")]
    BadId {
        /// The field.
        field: &'static str,
        /// Why.
        reason: TokenError,
    },
    /// The model id is malformed.
    #[error("field \"modelId\" {reason}")]
    BadModelId {
        /// Why.
        reason: String,
    },
    /// `priority` is not one of the three names.
    #[error("field \"priority\" is {value:?}, expected \"high\", \"medium\" or \"low\"")]
    BadPriority {
        /// The value given.
        value: String,
    },
}

impl From<BodyError> for RequestError {
    fn from(e: BodyError) -> RequestError {
        match e {
            BodyError::TooDeep => RequestError::TooDeep,
            BodyError::InvalidUtf8 { offset } => RequestError::InvalidUtf8 { offset },
        }
    }
}

impl RequestError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            RequestError::PayloadTooLarge { .. } | RequestError::PromptTooLarge { .. } => {
                ErrorCode::PayloadTooLarge
            }
            _ => ErrorCode::InvalidRequest,
        }
    }
}

/// Decodes and validates an inference request.
pub fn decode_request(payload: &[u8], limits: &RequestLimits) -> Result<ValidRequest, Rejection> {
    if payload.len() > limits.payload_bytes_max {
        // Still read the id, so the client hears why: parse the message when it is not absurdly
        // large, and scan it when it is or when it does not parse.
        let parsed = (payload.len() <= 4 * NATS_PAYLOAD_BYTES_MAX).then(|| parse_object(payload));
        let request_id = match parsed {
            Some(Ok(map)) => readable_id(&map),
            _ => scan_request_id(payload),
        };
        return Err(Rejection {
            request_id,
            error: RequestError::PayloadTooLarge {
                len: payload.len(),
                limit: limits.payload_bytes_max,
            },
        });
    }
    let map = parse_object(payload).map_err(|error| Rejection {
        request_id: scan_request_id(payload),
        error,
    })?;
    let request_id = readable_id(&map);
    validate(&map, limits).map_err(|error| Rejection { request_id, error })
}

/// Decodes a cancel message and returns the request id it names.
pub fn decode_cancel(payload: &[u8]) -> Result<String, RequestError> {
    if payload.len() > 4096 {
        return Err(RequestError::PayloadTooLarge {
            len: payload.len(),
            limit: 4096,
        });
    }
    let map = parse_object(payload)?;
    request_id_field(&map)
}

fn parse_object(payload: &[u8]) -> Result<Map<String, Value>, RequestError> {
    check_depth(payload)?;
    check_utf8(payload)?;
    match serde_json::from_slice::<Value>(&repair_surrogates(payload)) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(RequestError::NotObject),
        Err(err) => Err(RequestError::NotJson {
            reason: err.to_string(),
        }),
    }
}

fn readable_id(map: &Map<String, Value>) -> Option<String> {
    request_id_field(map).ok()
}

fn request_id_field(map: &Map<String, Value>) -> Result<String, RequestError> {
    let id = required_str(map, "requestId")?;
    check_token(id).map_err(|reason| RequestError::BadId {
        field: "requestId",
        reason,
    })?;
    Ok(id.to_owned())
}

fn validate(
    map: &Map<String, Value>,
    limits: &RequestLimits,
) -> Result<ValidRequest, RequestError> {
    let request_id = request_id_field(map)?;
    let model_id = required_str(map, "modelId")?;
    check_model_id(model_id)?;
    let prompt = required_str(map, "prompt")?;
    if prompt.len() > limits.prompt_bytes_max {
        return Err(RequestError::PromptTooLarge {
            len: prompt.len(),
            limit: limits.prompt_bytes_max,
        });
    }
    Ok(ValidRequest {
        request_id,
        model_id: model_id.to_owned(),
        prompt: prompt.to_owned(),
        max_tokens: max_tokens_field(map, limits)?,
        temperature: bounded_f64(
            map,
            "temperature",
            |t| (0.0..=2.0).contains(&t),
            "between 0 and 2",
        )?,
        top_p: bounded_f64(
            map,
            "topP",
            |p| p > 0.0 && p <= 1.0,
            "greater than 0 and at most 1",
        )?,
        session_id: session_id_field(map)?,
        priority: priority_field(map)?,
        timeout: timeout_field(map, limits)?,
    })
}

fn max_tokens_field(
    map: &Map<String, Value>,
    limits: &RequestLimits,
) -> Result<Option<u32>, RequestError> {
    optional_uint(map, "maxTokens")?
        .map(|value| match u32::try_from(value) {
            Ok(v) if (1..=limits.max_tokens_max).contains(&v) => Ok(v),
            _ => Err(RequestError::OutOfRange {
                field: "maxTokens",
                value: value.to_string(),
                range: format!("between 1 and {}", limits.max_tokens_max),
            }),
        })
        .transpose()
}

/// An optional number that must satisfy `within`, described by `range` in the error.
fn bounded_f64(
    map: &Map<String, Value>,
    field: &'static str,
    within: impl Fn(f64) -> bool,
    range: &str,
) -> Result<Option<f64>, RequestError> {
    optional_f64(map, field)?
        .map(|v| {
            if within(v) {
                Ok(v)
            } else {
                Err(RequestError::OutOfRange {
                    field,
                    value: v.to_string(),
                    range: range.to_owned(),
                })
            }
        })
        .transpose()
}

fn session_id_field(map: &Map<String, Value>) -> Result<Option<String>, RequestError> {
    optional_str(map, "sessionId")?
        .map(|s| {
            check_token(s)
                .map(|()| s.to_owned())
                .map_err(|reason| RequestError::BadId {
                    field: "sessionId",
                    reason,
                })
        })
        .transpose()
}

fn priority_field(map: &Map<String, Value>) -> Result<Priority, RequestError> {
    let stream = match map.get("stream") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(other) => return Err(wrong_type("stream", "a boolean", other)),
    };
    match optional_str(map, "priority")? {
        Some("high") => Ok(Priority::High),
        Some("medium") => Ok(Priority::Medium),
        Some("low") => Ok(Priority::Low),
        Some(other) => Err(RequestError::BadPriority {
            value: other.to_owned(),
        }),
        // The existing worker's queue serves non-streaming requests first.
        None if stream == Some(false) => Ok(Priority::High),
        None => Ok(Priority::Medium),
    }
}

fn timeout_field(
    map: &Map<String, Value>,
    limits: &RequestLimits,
) -> Result<Option<Duration>, RequestError> {
    let timeout_max_ms = u64::try_from(limits.timeout_max.as_millis()).unwrap_or(u64::MAX);
    optional_uint(map, "timeoutMs")?
        .map(|ms| {
            if (1..=timeout_max_ms).contains(&ms) {
                Ok(Duration::from_millis(ms))
            } else {
                Err(RequestError::OutOfRange {
                    field: "timeoutMs",
                    value: ms.to_string(),
                    range: format!("between 1 and {timeout_max_ms}"),
                })
            }
        })
        .transpose()
}

fn check_model_id(model_id: &str) -> Result<(), RequestError> {
    if model_id.is_empty() {
        return Err(RequestError::BadModelId {
            reason: "is empty".to_owned(),
        });
    }
    if model_id.len() > MODEL_ID_BYTES_MAX {
        return Err(RequestError::BadModelId {
            reason: format!("is {} bytes, limit {MODEL_ID_BYTES_MAX}", model_id.len()),
        });
    }
    let allowed =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | '@' | ':');
    if let Some(bad) = model_id.chars().find(|&c| !allowed(c)) {
        return Err(RequestError::BadModelId {
            reason: format!("contains {bad:?}; allowed are letters, digits and _ - . / @ :"),
        });
    }
    Ok(())
}

fn describe(value: &Value) -> String {
    let mut text = value.to_string();
    if text.len() > 40 {
        let cut = (0..=40)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("{kind} ({text})")
}

fn wrong_type(field: &'static str, expected: &'static str, found: &Value) -> RequestError {
    RequestError::WrongType {
        field,
        expected,
        found: describe(found),
    }
}

fn required_str<'m>(
    map: &'m Map<String, Value>,
    field: &'static str,
) -> Result<&'m str, RequestError> {
    match map.get(field) {
        None | Some(Value::Null) => Err(RequestError::Missing { field }),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(wrong_type(field, "a string", other)),
    }
}

fn optional_str<'m>(
    map: &'m Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'m str>, RequestError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(field, "a string", other)),
    }
}

fn optional_f64(
    map: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<f64>, RequestError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| wrong_type(field, "a number", &Value::Number(n.clone()))),
        Some(other) => Err(wrong_type(field, "a number", other)),
    }
}

fn optional_uint(
    map: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<u64>, RequestError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                return Ok(Some(v));
            }
            // JavaScript writes integral floats without a fraction, but accept `10.0` too.
            match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f >= 0.0 && f < u64::MAX as f64 => {
                    Ok(Some(f as u64))
                }
                Some(f) if f < 0.0 || f.fract() == 0.0 => Err(RequestError::OutOfRange {
                    field,
                    value: n.to_string(),
                    range: "a non-negative integer".to_owned(),
                }),
                _ => Err(wrong_type(field, "an integer", &Value::Number(n.clone()))),
            }
        }
        Some(other) => Err(wrong_type(field, "an integer", other)),
    }
}
