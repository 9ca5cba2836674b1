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

/// The response stream of one request: `response.{requestId}`.
pub fn response(request_id: &str) -> String {
    debug_assert!(check_token(request_id).is_ok());
    format!("response.{request_id}")
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
