//! The embedded `nats-server`: with `nats.mode: embedded` the worker starts a loopback broker
//! of its own (from `PATH`), waits until it is ready, and stops it when the worker stops.
//!
//! The broker is the worker's alone, and never adopted. While it runs, its pid, port and start
//! time are kept in `<stateDir>/nats-server.pid` ([`ServerRecord`]). A worker that was killed
//! (SIGKILL, a crash) could not stop its server; the next start on that state directory finds
//! the record, checks that the process under that pid is still that server (a `nats-server` on
//! that port, started at that second: a pid the system has since given to another process is
//! left alone), stops it (SIGTERM, then SIGKILL after [`EMBEDDED_ORPHAN_STOP_TIMEOUT`]) and
//! says so in the log, or refuses to start when it cannot. The state-directory lock
//! (`instance`) guarantees that a record is never a live worker's.
//!
//! Anything else on the port (a broker somebody runs, another worker's embedded server) stops
//! the start with [`EmbeddedError::PortTaken`]: a broker the worker did not start is one nobody
//! supervises for it; use it with `nats.mode: external`.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sysinfo::{Pid, ProcessRefreshKind, ProcessStatus, ProcessesToUpdate, Signal, UpdateKind};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{debug, info, warn};

use crate::config::EmbeddedNats;
use crate::limits::{
    EMBEDDED_NATS_READY_TIMEOUT, EMBEDDED_ORPHAN_STOP_TIMEOUT, STATE_FILE_BYTES_MAX,
};

/// Longest wait for a connection to the port, to see whether anything listens there.
const PORT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a stopping orphan is looked at again (it is not our child: nothing signals its
/// end).
const ORPHAN_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The file in the state directory recording the running embedded server.
pub const SERVER_RECORD_FILE: &str = "nats-server.pid";

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
    /// Something this worker did not start listens on the port.
    #[error(
        "port {port} is taken by a process this worker did not start (a message server run by \
         someone else, or another worker's embedded one): stop it, set nats.embedded.port to a \
         free port, or use that server with nats.mode: external and nats.serverUrl: \
         nats://127.0.0.1:{port}"
    )]
    PortTaken {
        /// The port.
        port: u16,
    },
    /// The embedded server of an earlier run is still there and would not stop.
    #[error(
        "the embedded nats-server of an earlier run (pid {pid}, port {port}) is still running \
         and cannot be stopped: {reason}; stop it by hand (kill -KILL {pid})"
    )]
    OrphanSurvived {
        /// Its pid.
        pid: u32,
        /// Its port.
        port: u16,
        /// Why not.
        reason: String,
    },
    /// The record in the state directory could not be read.
    #[error("embedded nats-server record {path}: {source}")]
    Record {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// What identifies an embedded server a worker started: kept in the state directory while it
/// runs, as `pid=`, `port=` and `started=` lines (`started`: Unix seconds, as the system
/// reports the process's start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerRecord {
    /// Its pid.
    pub pid: u32,
    /// Its client port.
    pub port: u16,
    /// When it started, Unix seconds.
    pub started: u64,
}

/// A process as the system shows it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenProcess {
    /// When it started, Unix seconds.
    pub started: u64,
    /// Its command line, program first.
    pub command: Vec<String>,
}

impl ServerRecord {
    /// The record's text.
    pub fn render(&self) -> String {
        format!(
            "pid={}\nport={}\nstarted={}\n",
            self.pid, self.port, self.started
        )
    }

    /// Reads a record; `None` when a line is not `key=value`, a key is unknown or repeated, a
    /// value is not a number (a pid of 0 included), or a key is missing.
    pub fn parse(text: &str) -> Option<ServerRecord> {
        let (mut pid, mut port, mut started) = (None, None, None);
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (key, value) = line.split_once('=')?;
            let slot_was_empty = match key {
                "pid" => pid.replace(value.parse::<u32>().ok()?).is_none(),
                "port" => port.replace(value.parse::<u16>().ok()?).is_none(),
                "started" => started.replace(value.parse::<u64>().ok()?).is_none(),
                _ => return None,
            };
            if !slot_was_empty {
                return None;
            }
        }
        Some(ServerRecord {
            pid: pid.filter(|&p| p != 0)?,
            port: port?,
            started: started?,
        })
    }

    /// Whether `seen`, the process now under this record's pid, is the server the record
    /// describes: started at the recorded second, a `nats-server` listening on its port.
    pub fn describes(&self, seen: &SeenProcess) -> bool {
        let port = self.port.to_string();
        let is_nats_server = seen.command.first().is_some_and(|program| {
            Path::new(program).file_name() == Some(std::ffi::OsStr::new("nats-server"))
        });
        let on_port = seen
            .command
            .windows(2)
            .any(|w| w[0] == "-p" && w[1] == port);
        seen.started == self.started && is_nats_server && on_port
    }
}

/// The process under `pid` now, if one runs (a zombie has ended: it is not one).
pub fn look_up(pid: u32) -> Option<SeenProcess> {
    let mut system = sysinfo::System::new().ok()?;
    let pid = Pid::from_u32(pid);
    system.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        true,
        ProcessRefreshKind::nothing().with_cmd(UpdateKind::Always),
    );
    let process = system.process(pid)?;
    if process.status() == ProcessStatus::Zombie {
        return None;
    }
    Some(SeenProcess {
        started: process.start_time(),
        command: process
            .cmd()
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect(),
    })
}

/// A running embedded server; dropping it (or [`EmbeddedServer::stop`]) stops the process and
/// removes its record.
pub struct EmbeddedServer {
    /// The process; taken by `stop`, killed when dropped.
    child: Option<Child>,
    /// The record of it in the state directory, removed once the process is stopped.
    record: Option<PathBuf>,
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
    /// Stops what an earlier run on `state_dir` left of its embedded server, then starts
    /// `nats-server` on 127.0.0.1 and the configured port and records it in `state_dir`. Fails
    /// when anything else listens on the port.
    pub async fn start(
        config: &EmbeddedNats,
        state_dir: &Path,
    ) -> Result<EmbeddedServer, EmbeddedError> {
        let port = config.port;
        let record_path = state_dir.join(SERVER_RECORD_FILE);
        if stop_orphan(&record_path)
            .await?
            .is_some_and(|orphan| orphan.port == port)
        {
            // An exiting process can look ended (a zombie, or a command line that reads empty)
            // a moment before its sockets are closed.
            let _ = tokio::time::timeout(EMBEDDED_ORPHAN_STOP_TIMEOUT, async {
                while port_in_use(port).await {
                    tokio::time::sleep(ORPHAN_POLL_INTERVAL).await;
                }
            })
            .await;
        }
        if port_in_use(port).await {
            return Err(EmbeddedError::PortTaken { port });
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
        let pid = child.id().unwrap_or(0);
        let stderr = child.stderr.take();
        // From here on, dropping `server` (any early return) kills the process and removes
        // its record.
        let mut server = EmbeddedServer {
            child: Some(child),
            record: None,
        };
        // Recorded before the wait for readiness, so a worker killed during it leaves a
        // record too.
        server.record = write_record(&record_path, pid, port);
        let stderr = stderr.ok_or_else(|| failed("no stderr pipe".to_owned()))?;
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
        info!(port, pid, "embedded nats-server started");
        Ok(server)
    }

    /// Stops the server, waits for it to exit, and removes its record.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(e) = child.kill().await {
                warn!(cause = %e, "cannot stop the embedded nats-server");
                // Keep the record: the next start stops what is left.
                self.record = None;
            } else {
                info!("embedded nats-server stopped");
            }
        }
        remove_record(self.record.take());
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && child.start_kill().is_err()
        {
            // It may still run: keep the record, so the next start stops it.
            self.record = None;
        }
        remove_record(self.record.take());
    }
}

/// Records the server just started; `None` (and a warning) when it cannot be recorded, since a
/// server that runs unrecorded is still better than none.
fn write_record(path: &Path, pid: u32, port: u16) -> Option<PathBuf> {
    let Some(seen) = look_up(pid) else {
        warn!(
            pid,
            "cannot read the embedded nats-server's start time; it is not recorded"
        );
        return None;
    };
    let record = ServerRecord {
        pid,
        port,
        started: seen.started,
    };
    // Write then rename, so a kill never leaves half a record.
    let tmp = path.with_extension("pid.tmp");
    match fs::write(&tmp, record.render()).and_then(|()| fs::rename(&tmp, path)) {
        Ok(()) => Some(path.to_owned()),
        Err(e) => {
            warn!(path = %path.display(), cause = %e, "cannot record the embedded nats-server");
            None
        }
    }
}

fn remove_record(path: Option<PathBuf>) {
    if let Some(path) = path
        && let Err(e) = fs::remove_file(&path)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), cause = %e, "cannot remove the embedded nats-server record");
    }
}

/// Whether anything accepts connections on the loopback `port`. A connection that hangs rather
/// than being refused also means somebody is there.
async fn port_in_use(port: u16) -> bool {
    let probe = tokio::net::TcpStream::connect(("127.0.0.1", port));
    !matches!(
        tokio::time::timeout(PORT_PROBE_TIMEOUT, probe).await,
        Ok(Err(_))
    )
}

/// Stops the server an earlier run recorded at `path`, if it still runs, and removes the
/// record; returns the record of the server it stopped.
async fn stop_orphan(path: &Path) -> Result<Option<ServerRecord>, EmbeddedError> {
    let mut text = String::new();
    let read = fs::File::open(path)
        .and_then(|file| file.take(STATE_FILE_BYTES_MAX).read_to_string(&mut text));
    match read {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(EmbeddedError::Record {
                path: path.to_owned(),
                source,
            });
        }
    }
    let stopped = match ServerRecord::parse(&text) {
        None => {
            warn!(path = %path.display(), "unreadable embedded nats-server record; ignored");
            None
        }
        Some(record) if look_up(record.pid).is_some_and(|seen| record.describes(&seen)) => {
            let signal = stop_process(&record).await?;
            warn!(
                pid = record.pid,
                port = record.port,
                signal,
                "stopped an orphaned embedded nats-server left by an earlier run on this state \
                 directory"
            );
            Some(record)
        }
        Some(record) => {
            debug!(
                pid = record.pid,
                "the embedded nats-server of an earlier run is gone"
            );
            None
        }
    };
    remove_record(Some(path.to_owned()));
    Ok(stopped)
}

/// Sends SIGTERM, then SIGKILL, to the recorded server until it is gone; returns the signal
/// that ended it.
async fn stop_process(record: &ServerRecord) -> Result<&'static str, EmbeddedError> {
    let survived = |reason: String| EmbeddedError::OrphanSurvived {
        pid: record.pid,
        port: record.port,
        reason,
    };
    for (signal, name) in [(Signal::Term, "TERM"), (Signal::Kill, "KILL")] {
        let mut system =
            sysinfo::System::new().map_err(|e| survived(format!("cannot list processes: {e}")))?;
        let pid = Pid::from_u32(record.pid);
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            true,
            ProcessRefreshKind::nothing(),
        );
        let Some(process) = system.process(pid) else {
            return Ok(name);
        };
        if process.kill_with(signal) != Some(true) {
            return Err(survived(format!("sending SIG{name} failed")));
        }
        // Only the start time tells: an exiting process's command line reads empty.
        let gone = tokio::time::timeout(EMBEDDED_ORPHAN_STOP_TIMEOUT, async {
            while look_up(record.pid).is_some_and(|seen| seen.started == record.started) {
                tokio::time::sleep(ORPHAN_POLL_INTERVAL).await;
            }
        })
        .await;
        if gone.is_ok() {
            return Ok(name);
        }
    }
    Err(survived(format!(
        "still there {EMBEDDED_ORPHAN_STOP_TIMEOUT:?} after SIGKILL"
    )))
}

#[cfg(test)]
mod tests;
