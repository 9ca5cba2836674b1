//! NATS subject names, built in one place.
//!
//! Ids are inserted verbatim as one subject token, so they must have passed
//! [`check_token`] (no `.`, `*`, `>`, whitespace) first; the builders assert it in debug builds.

use crate::limits::ID_BYTES_MAX;

/// Registrations, worker → controller.
pub const REGISTER: &str = "worker.register";
/// Heartbeats, worker → controller.
pub const HEARTBEAT: &str = "worker.heartbeat";
/// Deregistrations, worker → controller.
pub const DEREGISTER: &str = "worker.deregister";

/// Inference requests for one worker: `worker.{workerId}.inference`.
pub fn inference(worker_id: &str) -> String {
    debug_assert!(check_token(worker_id).is_ok());
    format!("worker.{worker_id}.inference")
}

/// Cancellations for one worker (extension): `worker.{workerId}.cancel`.
pub fn cancel(worker_id: &str) -> String {
    debug_assert!(check_token(worker_id).is_ok());
    format!("worker.{worker_id}.cancel")
}

/// Model control for one worker (extension): `worker.{workerId}.models`, request/reply.
pub fn models(worker_id: &str) -> String {
    debug_assert!(check_token(worker_id).is_ok());
    format!("worker.{worker_id}.models")
}

/// The response stream of one request: `response.{requestId}`.
pub fn response(request_id: &str) -> String {
    debug_assert!(check_token(request_id).is_ok());
    format!("response.{request_id}")
}

/// Queue group of the model-addressed subjects: each request goes to one worker of the group.
pub const MODEL_QUEUE_GROUP: &str = "mlx-workers";

/// Requests for a model, on any worker that serves it: `inference.{token}`, where the token is
/// [`model_token`] of the model id.
pub fn model_inference(model_id: &str) -> String {
    format!("inference.{}", model_token(model_id))
}

/// A model id as one subject token, reversibly: ASCII letters, digits and `-` stay; every other
/// byte of its UTF-8 (`.`, `/`, `:`, `@`, `_` …) becomes `_` and two uppercase hex digits.
/// `mlx-community/Llama-3.2-1B` → `mlx-community_2FLlama-3_2E2-1B`.
pub fn model_token(model_id: &str) -> String {
    let mut token = String::with_capacity(model_id.len() + 8);
    for &byte in model_id.as_bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            token.push(char::from(byte));
        } else {
            token.push_str(&format!("_{byte:02X}"));
        }
    }
    token
}

/// The model id of a [`model_token`]; `None` for a string no model id encodes to.
pub fn model_id_from_token(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'_' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                if hex.bytes().any(|b| b.is_ascii_lowercase()) {
                    return None;
                }
                let byte = u8::from_str_radix(hex, 16).ok()?;
                if byte.is_ascii_alphanumeric() || byte == b'-' {
                    return None;
                }
                out.push(byte);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b == b'-' => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// Why a string cannot be one subject token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The string is empty.
    #[error("is empty")]
    Empty,
    /// The string is longer than the limit.
    #[error("is {len} bytes, limit {ID_BYTES_MAX}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The string holds a character NATS gives a meaning in subjects.
    #[error("contains {found:?}, which cannot appear in a NATS subject token")]
    BadCharacter {
        /// The offending character.
        found: char,
    },
}

/// Checks that `id` can stand as one NATS subject token: non-empty, at most
/// [`ID_BYTES_MAX`] bytes, and free of `.`, `*`, `>`, whitespace and control characters.
pub fn check_token(id: &str) -> Result<(), TokenError> {
    if id.is_empty() {
        return Err(TokenError::Empty);
    }
    if id.len() > ID_BYTES_MAX {
        return Err(TokenError::TooLong { len: id.len() });
    }
    match id
        .chars()
        .find(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
    {
        Some(found) => Err(TokenError::BadCharacter { found }),
        None => Ok(()),
    }
}
