//! One process per worker id.
//!
//! Two processes with one worker id both take every request sent to it: two interleaved streams
//! and two terminal messages on one `response.<requestId>`, and heartbeats alternating between
//! two sets of figures. It happens when a second worker starts in the same state directory
//! (where a generated id is kept) or on a machine cloned from another's disk image. So the
//! binary's `run`, before it subscribes to anything:
//!
//! 1. takes a [`StateLock`]: an exclusive advisory lock (`flock`) on `<stateDir>/worker.lock`,
//!    held for the whole run. The operating system drops it when the process ends, however it
//!    ends (SIGKILL included), so a crashed worker never leaves a stale lock; the file's text,
//!    the holder's pid, only serves the message of the process that is refused;
//! 2. asks the bus with [`check_bus`]: a request to `$SRV.PING.mlx-worker.<id>`, which every
//!    running worker answers (`worker::service`). An answer within
//!    [`INSTANCE_CHECK_TIMEOUT`] means another instance is live, on this host with another state
//!    directory or on another host; "no responders" or silence means none.
//!
//! Two workers that start at the same instant can both pass the bus check (neither answers yet);
//! noticing a second instance while running is presence's concern, not this module's.

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::limits::{INSTANCE_CHECK_TIMEOUT, STATE_FILE_BYTES_MAX};
use crate::protocol::service::{PingResponse, SERVICE_NAME};
use crate::transport::nats::NatsTransport;
use crate::transport::{Transport, TransportError};

/// The lock file in the state directory.
pub const LOCK_FILE: &str = "worker.lock";

/// Labels of the other instance's answer shown in the message, at most.
const LABELS_SHOWN_MAX: usize = 8;

/// Characters of one label value shown, at most.
const LABEL_CHARS_MAX: usize = 64;

/// Why this process must not run as the worker.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The lock file could not be created, opened or written.
    #[error("state directory lock {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Another process holds the state directory.
    #[error(
        "state directory {dir} is in use by another mlx-worker{by}: one process per state \
         directory; stop that process, or give this worker its own worker.stateDir",
        dir = .state_dir.display(),
        by = .holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Locked {
        /// The state directory.
        state_dir: PathBuf,
        /// The holder's pid, as it recorded it in the lock file.
        holder: Option<u32>,
    },
    /// A live worker already answers for this id on the bus.
    #[error(
        "another mlx-worker already answers for worker id {worker_id} ({other}): one process \
         per worker id; stop that worker, or give this one another id (worker.workerId; on a \
         machine cloned from another, delete worker-id in the state directory)"
    )]
    Live {
        /// The worker id.
        worker_id: String,
        /// What its answer says about it.
        other: OtherInstance,
    },
}

impl InstanceError {
    /// Whether another instance is the cause (rather than the state directory's file system).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            InstanceError::Locked { .. } | InstanceError::Live { .. }
        )
    }
}

/// The exclusive lock on a state directory, held while the worker runs; dropping it (or the
/// process ending, however it ends) releases it.
#[derive(Debug)]
pub struct StateLock {
    /// The open lock file; the lock lives as long as this descriptor.
    file: File,
    /// Its path.
    path: PathBuf,
}

impl StateLock {
    /// Creates `state_dir` if needed and locks it, recording this process's pid in the lock
    /// file; fails with [`InstanceError::Locked`] when another process holds it.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, InstanceError> {
        let path = state_dir.join(LOCK_FILE);
        let io_err = |source| InstanceError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(state_dir).map_err(io_err)?;
        // Never truncate on open: the file may be another process's, holding its pid.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = (&file)
                    .take(STATE_FILE_BYTES_MAX)
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| parse_holder(&text));
                return Err(InstanceError::Locked {
                    state_dir: state_dir.to_owned(),
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_err(e)),
        }
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(io_err)?;
        debug!(path = %path.display(), "state directory locked");
        Ok(StateLock { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // Closing the file would release the lock too; unlocking first makes it explicit. The
        // file stays: removing it could let two processes lock two different files.
        if let Err(e) = self.file.unlock() {
            debug!(path = %self.path.display(), cause = %e, "cannot unlock the state directory");
        }
    }
}

/// The pid a lock file records: one decimal number, surrounding whitespace ignored; `None` for
/// anything else (an empty file: its holder has not written it yet).
pub fn parse_holder(text: &str) -> Option<u32> {
    text.trim().parse().ok().filter(|&pid| pid != 0)
}

/// What another instance's answer to the ping says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OtherInstance {
    /// A ping response: its version and labels (`worker_id` left out, it is the id asked for).
    Ping {
        /// Its version.
        version: String,
        /// Its labels, as `key=value`, a few at most.
        labels: Vec<String>,
    },
    /// Something answered that is not a ping response.
    Unreadable,
}

impl OtherInstance {
    /// Reads an answer to `$SRV.PING.mlx-worker.<id>`.
    pub fn from_answer(answer: &[u8]) -> OtherInstance {
        let Ok(ping) = serde_json::from_slice::<PingResponse>(answer) else {
            return OtherInstance::Unreadable;
        };
        let labels = ping
            .header
            .metadata
            .iter()
            .filter(|(key, _)| key.as_str() != "worker_id")
            .take(LABELS_SHOWN_MAX)
            .map(|(key, value)| {
                let key: String = key.chars().take(LABEL_CHARS_MAX).collect();
                let value: String = value.chars().take(LABEL_CHARS_MAX).collect();
                format!("{key}={value}")
            })
            .collect();
        OtherInstance::Ping {
            version: ping.header.version.chars().take(LABEL_CHARS_MAX).collect(),
            labels,
        }
    }
}

impl fmt::Display for OtherInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OtherInstance::Ping { version, labels } => {
                write!(f, "version {version}")?;
                labels.iter().try_for_each(|label| write!(f, ", {label}"))
            }
            OtherInstance::Unreadable => f.write_str("its answer is not a ping response"),
        }
    }
}

/// The subject only a worker with this id answers pings on.
pub fn ping_subject(worker_id: &str) -> String {
    format!("$SRV.PING.{SERVICE_NAME}.{worker_id}")
}

/// Asks the bus whether a live worker already answers for `worker_id`; fails with
/// [`InstanceError::Live`] when one does. Waits [`INSTANCE_CHECK_TIMEOUT`] at most for the
/// connection and as long again for an answer. When the question cannot be asked (no
/// connection yet) it says so in the log and lets the worker start.
pub async fn check_bus(transport: &NatsTransport, worker_id: &str) -> Result<(), InstanceError> {
    let mut connection = transport.connection();
    let connected =
        tokio::time::timeout(INSTANCE_CHECK_TIMEOUT, connection.wait_for(|c| c.connected)).await;
    if !matches!(connected, Ok(Ok(_))) {
        warn!(
            worker_id,
            "not connected to the message server yet: cannot ask whether another instance \
             answers for this worker id"
        );
        return Ok(());
    }
    let subject = ping_subject(worker_id);
    match transport
        .request(subject, Bytes::new(), INSTANCE_CHECK_TIMEOUT)
        .await
    {
        Ok(Some(answer)) => Err(InstanceError::Live {
            worker_id: worker_id.to_owned(),
            other: OtherInstance::from_answer(&answer),
        }),
        Ok(None) => {
            info!(worker_id, "no other instance answers for this worker id");
            Ok(())
        }
        // A broker account that may not publish on the subject is silent the same way.
        Err(TransportError::TimedOut { millis }) => {
            warn!(
                worker_id,
                millis, "no answer to the ping for this worker id; taking it that no other runs"
            );
            Ok(())
        }
        Err(err) => {
            warn!(
                worker_id,
                cause = %err,
                "cannot ask whether another instance answers for this worker id"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
