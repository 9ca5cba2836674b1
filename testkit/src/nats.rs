//! A real `nats-server` on a free loopback port, started with [`NatsOptions`] and killed when
//! its [`NatsServer`] is dropped.
//!
//! The options say what the server demands of clients (TLS, a password, a token) or hand it a
//! whole configuration file (NKey users, an operator, accounts); whatever else a test needs of
//! the server (a cluster, JetStream) is one more field here, rendered in [`NatsOptions::args`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::PATIENCE;

#[cfg(test)]
mod tests;

/// The certificates a TLS server presents and checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (PEM).
    pub client_ca: Option<PathBuf>,
}

/// How to start a server; the default is a plain one that admits anybody.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatsOptions {
    /// TLS required of every client.
    pub tls: Option<ServerTls>,
    /// A user and password required of every client.
    pub user_password: Option<(String, String)>,
    /// A token required of every client.
    pub token: Option<String>,
    /// A configuration file (`-c`), for what has no flag.
    pub config_file: Option<PathBuf>,
    /// The HTTP monitoring port (`-m`: `/connz`, `/varz`, …).
    pub monitor_port: Option<u16>,
    /// JetStream enabled, storing in this directory (`-js -sd`).
    pub jetstream: Option<PathBuf>,
}

impl NatsOptions {
    /// A plain server.
    pub fn new() -> NatsOptions {
        NatsOptions::default()
    }

    /// Requires TLS.
    pub fn tls(mut self, tls: ServerTls) -> NatsOptions {
        self.tls = Some(tls);
        self
    }

    /// Requires `user` with `password`.
    pub fn user_password(mut self, user: &str, password: &str) -> NatsOptions {
        self.user_password = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Requires `token`.
    pub fn token(mut self, token: &str) -> NatsOptions {
        self.token = Some(token.to_owned());
        self
    }

    /// Reads `file` as the server's configuration.
    pub fn config_file(mut self, file: &Path) -> NatsOptions {
        self.config_file = Some(file.to_owned());
        self
    }

    /// Serves the HTTP monitoring endpoints on `port`.
    pub fn monitor_port(mut self, port: u16) -> NatsOptions {
        self.monitor_port = Some(port);
        self
    }

    /// Enables JetStream, storing in `dir`.
    pub fn jetstream(mut self, dir: &std::path::Path) -> NatsOptions {
        self.jetstream = Some(dir.to_owned());
        self
    }

    /// The command-line arguments these options stand for (after the address and port).
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(tls) = &self.tls {
            args.extend(["--tls".into(), "--tlscert".into(), tls.cert.clone().into()]);
            args.extend(["--tlskey".into(), tls.key.clone().into()]);
            if let Some(ca) = &tls.client_ca {
                args.extend([
                    "--tlsverify".into(),
                    "--tlscacert".into(),
                    ca.clone().into(),
                ]);
            }
        }
        if let Some((user, password)) = &self.user_password {
            args.extend([
                "--user".into(),
                user.into(),
                "--pass".into(),
                password.into(),
            ]);
        }
        if let Some(token) = &self.token {
            args.extend(["--auth".into(), token.into()]);
        }
        if let Some(file) = &self.config_file {
            args.extend(["-c".into(), file.clone().into()]);
        }
        if let Some(port) = self.monitor_port {
            args.extend(["-m".into(), port.to_string().into()]);
        }
        if let Some(dir) = &self.jetstream {
            args.extend(["-js".into(), "-sd".into(), dir.clone().into()]);
        }
        args
    }
}

/// The first of `dirs` that holds `nats-server`; else a message saying how to install it.
pub fn find_nats_server(dirs: impl IntoIterator<Item = PathBuf>) -> Result<PathBuf, String> {
    dirs.into_iter()
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            "nats-server not found on PATH or in /usr/sbin: run ci/setup.sh (it installs it)"
                .to_owned()
        })
}

/// The `nats-server` binary on `PATH`, else in `/usr/sbin` or `/usr/local/bin`; fails the
/// test when there is none.
pub fn nats_server_binary() -> PathBuf {
    #[allow(clippy::disallowed_methods)] // Tests may look at PATH.
    let path: Option<OsString> = std::env::var_os("PATH");
    let dirs = path
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")]);
    find_nats_server(dirs).unwrap_or_else(|missing| panic!("{missing}"))
}

/// The version `nats-server --version` prints, or `unknown`.
pub fn nats_server_version() -> String {
    std::process::Command::new(nats_server_binary())
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .trim_start_matches("nats-server: ")
                .to_owned()
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A port nobody listens on at the moment.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// A `nats-server` process on 127.0.0.1.
pub struct NatsServer {
    /// The process; killed when dropped.
    child: Option<Child>,
    /// Its client port.
    pub port: u16,
    options: NatsOptions,
}

impl NatsServer {
    /// Starts a plain server on a free port and waits until it accepts clients.
    pub async fn start() -> NatsServer {
        NatsServer::start_with(NatsOptions::new()).await
    }

    /// Starts a server with `options` on a free port and waits until it accepts clients.
    pub async fn start_with(options: NatsOptions) -> NatsServer {
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            options,
        };
        if let Err(e) = server.spawn().await {
            panic!("nats-server did not start: {e:#}");
        }
        server
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(self.options.args())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn nats-server")?;
        let stderr = child.stderr.take().context("nats-server stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let ready = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await? {
                if line.contains("Server is ready") {
                    return Ok::<bool, std::io::Error>(true);
                }
            }
            Ok(false)
        })
        .await;
        match ready {
            Ok(Ok(true)) => {}
            other => bail!("nats-server did not become ready: {other:?}"),
        }
        // Keep draining its log so the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        Ok(())
    }

    /// The client URL: `tls://` when the server requires TLS, else `nats://`.
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "tls"
        } else {
            "nats"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill nats-server");
        }
    }

    /// Starts it again on the same port, with the same options.
    pub async fn restart(&mut self) {
        self.kill().await;
        // The port may linger for a moment after the kill; retry until it binds.
        for _ in 0..50 {
            if self.spawn().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("nats-server did not restart on port {}", self.port);
    }
}

/// How long a cluster node in lame duck mode waits before it closes client connections.
pub const LAME_DUCK_GRACE: Duration = Duration::from_secs(10);

/// A JetStream cluster of `nats-server` processes on 127.0.0.1, each with its own store,
/// monitoring port, and a lame duck mode that waits [`LAME_DUCK_GRACE`] before it closes
/// any client's connection (so a client that leaves earlier left by itself).
pub struct NatsCluster {
    /// The nodes, by index.
    pub nodes: Vec<NatsServer>,
    /// Each node's monitoring port (`/connz`, `/jsz`).
    pub monitor_ports: Vec<u16>,
    /// The configuration files and stores.
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `size` nodes routed to each other, with JetStream, and waits until each accepts
    /// clients (not until JetStream has elected its leader: see [`NatsCluster::urls`]).
    pub async fn start(size: usize) -> NatsCluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let monitor_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes: Vec<String> = route_ports
            .iter()
            .map(|p| format!("\"nats://127.0.0.1:{p}\""))
            .collect();
        let mut starting = Vec::new();
        for (n, route_port) in route_ports.iter().enumerate() {
            let store = dir.path().join(format!("n{n}"));
            let conf = dir.path().join(format!("n{n}.conf"));
            let text = format!(
                "server_name: \"n{n}\"\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 lame_duck_duration: \"30s\"\n\
                 lame_duck_grace_period: \"10s\"\n\
                 cluster {{\n  name: \"c\"\n  listen: \"127.0.0.1:{route_port}\"\n  routes: [{}]\n}}\n",
                store.display(),
                routes.join(", ")
            );
            std::fs::write(&conf, text).expect("write a node's configuration");
            let options = NatsOptions::new()
                .config_file(&conf)
                .monitor_port(monitor_ports[n]);
            starting.push(NatsServer::start_with(options));
        }
        let nodes = futures::future::join_all(starting).await;
        NatsCluster {
            nodes,
            monitor_ports,
            _dir: dir,
        }
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }
}
