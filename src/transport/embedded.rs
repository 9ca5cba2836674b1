//! The embedded `nats-server`: with `nats.mode: embedded` the worker starts a loopback broker
//! of its own (from `PATH`), waits until it is ready, and stops it when the worker stops.
//!
//! When something already listens on the port (another worker's embedded server, or a broker
//! the operator runs), the worker uses it instead of starting a second one.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::config::EmbeddedNats;
use crate::limits::EMBEDDED_NATS_READY_TIMEOUT;

/// Why the embedded server could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// `nats-server` is not installed.
    #[error(
        "nats-server is not on PATH: install it (Debian/Ubuntu: `apt-get install nats-server`, \
         macOS: `brew install nats-server`, or run ci/setup.sh), or set nats.serverUrl to a \
         running server"
    )]
    NotInstalled,
    /// It started but did not become ready.
    #[error("the embedded nats-server on port {port} did not start: {reason}")]
    Failed {
        /// The port.
        port: u16,
        /// What was seen.
        reason: String,
    },
}

/// A running embedded server; dropping it (or [`EmbeddedServer::stop`]) stops the process.
pub struct EmbeddedServer {
    /// The process, when this worker started it (`None` when it reuses a running broker).
    child: Option<Child>,
}

#[allow(clippy::disallowed_methods)] // Looking for the binary on PATH is part of the contract.
fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

impl EmbeddedServer {
    /// Starts `nats-server` on 127.0.0.1 and the configured port, or reuses one already there.
    pub async fn start(config: &EmbeddedNats) -> Result<EmbeddedServer, EmbeddedError> {
        let port = config.port;
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            info!(
                port,
                "a message server already listens on the embedded port; using it"
            );
            return Ok(EmbeddedServer { child: None });
        }
        let binary = find_binary().ok_or(EmbeddedError::NotInstalled)?;
        let failed = |reason: String| EmbeddedError::Failed { port, reason };
        let mut child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| failed(format!("cannot run {}: {e}", binary.display())))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| failed("no stderr pipe".to_owned()))?;
        let mut lines = BufReader::new(stderr).lines();
        let mut last = String::new();
        let ready = tokio::time::timeout(EMBEDDED_NATS_READY_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Server is ready") {
                    return true;
                }
                last = line;
            }
            false
        })
        .await;
        match ready {
            Ok(true) => {}
            Ok(false) => return Err(failed(format!("it exited: {last}"))),
            Err(_) => {
                return Err(failed(format!(
                    "not ready within {EMBEDDED_NATS_READY_TIMEOUT:?}"
                )));
            }
        }
        // Keep reading its log so its pipe never fills; it ends when the process does.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("[ERR]") || line.contains("[WRN]") {
                    warn!(target: "mlx_worker::nats_server", "nats-server: {line}");
                }
            }
        });
        info!(
            port,
            pid = child.id().unwrap_or(0),
            "embedded nats-server started"
        );
        Ok(EmbeddedServer { child: Some(child) })
    }

    /// Stops the server if this worker started it, and waits for it to exit.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(e) = child.kill().await {
                warn!(cause = %e, "cannot stop the embedded nats-server");
            } else {
                info!("embedded nats-server stopped");
            }
        }
    }
}
