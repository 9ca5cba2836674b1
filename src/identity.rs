//! Who this worker is: its id (configured, or generated once and kept in the state directory so a
//! restart keeps its identity), its host name and the address it announces.
//!
//! Read by the binary before the worker is built; the worker core receives the result.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::protocol::subject::check_token;

/// What the worker announces about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The worker id: one NATS subject token.
    pub worker_id: String,
    /// Host name.
    pub hostname: String,
    /// An IP literal of the host.
    pub ip: String,
    /// The HTTP port it serves metrics and health on.
    pub port: u16,
}

/// The file in the state directory holding a generated worker id.
pub const WORKER_ID_FILE: &str = "worker-id";

/// Why the worker id could not be settled.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The state file could not be read or written.
    #[error("worker id file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The state file holds something that is not a usable id.
    #[error(
        "worker id file {path} holds {found:?}, which {reason}; delete it to generate a new id"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What it holds (shortened).
        found: String,
        /// Why it cannot be used.
        reason: String,
    },
}

/// The configured id, else the one kept in `state_dir`, else a new UUID v4 written there.
pub fn worker_id(configured: Option<&str>, state_dir: &Path) -> Result<String, IdentityError> {
    if let Some(id) = configured {
        return Ok(id.to_owned());
    }
    let path = state_dir.join(WORKER_ID_FILE);
    let io_err = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    match fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            check_token(id).map_err(|e| IdentityError::Corrupt {
                path: path.clone(),
                found: id.chars().take(64).collect(),
                reason: e.to_string(),
            })?;
            Ok(id.to_owned())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            fs::create_dir_all(state_dir).map_err(io_err)?;
            // Write then rename, so a crash never leaves a half-written id.
            let tmp = state_dir.join(format!("{WORKER_ID_FILE}.tmp"));
            fs::write(&tmp, format!("{id}\n")).map_err(io_err)?;
            fs::rename(&tmp, &path).map_err(io_err)?;
            Ok(id)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// The host's name, or `localhost` when the system will not tell.
pub fn hostname() -> String {
    sysinfo::System::host_name().unwrap_or_else(|_| "localhost".to_owned())
}

/// The first non-loopback, non-link-local IPv4 address of the host, else the first such IPv6
/// address, else `127.0.0.1` (as the existing worker does).
pub fn primary_ip() -> String {
    let Ok(networks) = sysinfo::Networks::new_with_refreshed_list() else {
        return "127.0.0.1".to_owned();
    };
    let mut addresses: Vec<IpAddr> = networks
        .values()
        .flat_map(|data| data.ip_networks().iter().map(|n| n.addr))
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_link_local(),
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
        })
        .collect();
    addresses.sort_by_key(|ip| (ip.is_ipv6(), *ip));
    addresses
        .first()
        .map_or_else(|| "127.0.0.1".to_owned(), IpAddr::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_id_is_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = worker_id(None, &state).unwrap();
        assert!(uuid::Uuid::parse_str(&first).is_ok());
        assert_eq!(worker_id(None, &state).unwrap(), first);
        assert_eq!(worker_id(Some("configured"), &state).unwrap(), "configured");
    }

    #[test]
    fn a_corrupt_id_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(WORKER_ID_FILE), "not.a token").unwrap();
        let err = worker_id(None, dir.path()).unwrap_err().to_string();
        assert!(err.contains("holds \"not.a token\""), "{err}");
        assert!(err.ends_with("delete it to generate a new id"), "{err}");
    }

    #[test]
    fn the_announced_address_is_an_ip_literal() {
        assert!(primary_ip().parse::<IpAddr>().is_ok());
        assert!(!hostname().is_empty());
    }
}
