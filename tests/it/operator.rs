// Goal: `worker.httpBindAddress` decides where the worker's HTTP port listens: given an IPv4
// or an IPv6 literal, the worker serves /metrics on that address and on no other.
// Method: the real binary against a real nats-server and the real runtime (the HTTP port
// opens once the runtime is up), started with `--http-bind-address`; the address its
// listening socket is bound to, from its log line; /metrics fetched there; and on Linux,
// where all of 127.0.0.0/8 reaches the loopback interface, a connection to another loopback
// address (or the other family's) refused, which a socket bound to every address would take.

use std::net::SocketAddr;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::http::get_from;
use testkit::*;

/// Runs the worker with its HTTP port on `address` and returns it with the address its
/// listening socket is bound to, as it logs it.
async fn serving_http_on(url: &str, address: &str) -> (Child, tempfile::TempDir, SocketAddr) {
    let state = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mlx-worker"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--nats-url", url, "--port", "0"])
        .args(["--http-bind-address", address])
        .env("MLX_WORKER_STATE_DIR", state.path())
        .env("MLX_WORKER_LOG_FORMAT", "text")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let bound = within("the worker to open its HTTP port", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("serving /metrics") {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .unwrap_or_else(|| panic!("no addr= in {line:?}"));
                return addr.parse::<SocketAddr>().unwrap();
            }
        }
        panic!("the worker exited before serving HTTP:\n{seen}");
    })
    .await;
    // Keep reading its log so the pipe never fills.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, state, bound)
}

/// `address:port` answers /metrics; on Linux, `elsewhere:port` refuses the connection.
async fn serves_only_there(bound: SocketAddr, elsewhere: &str) {
    let (status, body) = get_from(bound, "/metrics").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("mlx_worker_requests_in_flight"), "{body}");
    if cfg!(target_os = "linux") {
        let other: SocketAddr = format!("{elsewhere}:{}", bound.port()).parse().unwrap();
        let refused = get_from(other, "/metrics").await.unwrap_err();
        assert_eq!(
            refused.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{other}: {refused}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_listens_on_the_configured_address_only() {
    let server = NatsServer::start().await;
    for (address, elsewhere) in [("127.0.0.1", "127.0.0.2"), ("::1", "127.0.0.1")] {
        let (mut child, _state, bound) = serving_http_on(&server.url(), address).await;
        assert_eq!(bound.ip().to_string(), address, "{bound}");
        serves_only_there(bound, elsewhere).await;
        // Its drain is another test's subject; the runtime ends with the worker's pipe.
        child.kill().await.unwrap();
    }
}
