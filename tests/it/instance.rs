// Goal: one process per worker id. A second worker on the same state directory refuses to start
// (the state-directory lock), and so does a second worker with the same id elsewhere on the bus
// (the $SRV.PING check); both exit with the one documented code, naming the other instance,
// while the first keeps serving. In embedded mode a SIGKILLed worker's nats-server is stopped at
// the next start instead of being adopted, and the new worker serves on a server of its own.
// The shipped least-privilege broker account lets the worker ask.
// Method: the real binary as child processes with chosen state directories, a real nats-server
// (or the worker's embedded one) and the real MLX runtime with the tiny model; processes are
// looked at through /proc.

use std::path::Path;
use std::process::Stdio;

use bytes::Bytes;
use mlx_worker::protocol::WorkerRegistration;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use mlx_worker::transport::Subscription;
use testkit::nats::free_port;
use testkit::runtime::TINY;
use testkit::*;

/// The exit code of a worker refused because another instance has its state directory or id.
const EXIT_INSTANCE_CONFLICT: i32 = 75;

/// `mlx-worker run <args> --port 0` from the repository root on `state`; killed if dropped.
fn worker_command(state: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mlx-worker"));
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("run")
        .args(args)
        .args(["--port", "0"])
        .env("MLX_WORKER_STATE_DIR", state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Starts a worker that runs until stopped.
fn spawn_worker(state: &Path, args: &[&str]) -> Child {
    worker_command(state, args)
        .spawn()
        .expect("start the mlx-worker binary")
}

/// Runs a worker that must refuse to start, and returns its exit code and log.
async fn refused_worker(what: &str, state: &Path, args: &[&str]) -> (Option<i32>, String) {
    refused(what, worker_command(state, args)).await
}

/// Runs `command`, a worker that must refuse to start, and returns its exit code and log.
async fn refused(what: &str, mut command: Command) -> (Option<i32>, String) {
    let output = command.stderr(Stdio::piped()).output();
    let output = within(&format!("the second worker to exit ({what})"), output)
        .await
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Sends SIGTERM to a worker and returns its exit code.
async fn terminate(mut worker: Child) -> Option<i32> {
    send_signal(worker.id().expect("running"), "TERM");
    within("the worker to exit", worker.wait())
        .await
        .unwrap()
        .code()
}

/// Whether process `pid` runs (a zombie has ended; only its parent has not collected it).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the parenthesised command name, which may itself hold spaces.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

/// The parent of process `pid`.
fn parent_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("PPid:"))
        .and_then(|ppid| ppid.trim().parse().ok())
}

/// The live `nats-server` processes started with `-p <port>`.
fn nats_servers_on(port: u16) -> Vec<u32> {
    let port = port.to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
                args.first().is_some_and(|a| a.ends_with(b"nats-server"))
                    && args
                        .windows(2)
                        .any(|w| w[0] == b"-p" && w[1] == port.as_bytes())
            })
        })
        .filter(|&pid| alive(pid))
        .collect()
}

/// Kills, when dropped, every nats-server left on the port: a failed test leaves none behind.
struct ReapNatsServers(u16);

impl Drop for ReapNatsServers {
    fn drop(&mut self) {
        for pid in nats_servers_on(self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// The id of the next worker registration on `registrations`.
async fn registered_id(registrations: &mut Subscription) -> String {
    let msg = within("the registration", registrations.next())
        .await
        .unwrap();
    let reg: WorkerRegistration = serde_json::from_slice(&msg.payload).unwrap();
    reg.worker_id
}

/// Waits until `id` has the tiny model loaded, then runs one request on it to `done`.
async fn serves_a_request(client: &Controller, id: &str, request_id: &str) {
    client
        .heartbeat_where(id, |hb| hb.metrics.models_loaded.contains(&TINY.to_owned()))
        .await;
    let body = json!({"requestId": request_id, "modelId": TINY, "prompt": "Hello", "maxTokens": 4});
    assert_done(&client.infer(id, body).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_on_the_same_state_directory_refuses_and_the_first_serves() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let mut registrations = client.subscribe("worker.register").await;
    let state = tempfile::tempdir().unwrap();
    // No --worker-id: the id is the one generated into the state directory.
    let url = server.url();
    let args = [&["--nats-url", &url][..], &SERVING_TINY].concat();
    let first = spawn_worker(state.path(), &args);
    let first_pid = first.id().expect("running");
    let id = registered_id(&mut registrations).await;
    let kept = std::fs::read_to_string(state.path().join("worker-id")).unwrap();
    assert_eq!(kept.trim(), id);

    let (code, stderr) = refused_worker("same state directory", state.path(), &args).await;
    assert_eq!(code, Some(EXIT_INSTANCE_CONFLICT), "{stderr}");
    let shown = state.path().display().to_string();
    assert!(
        stderr.contains(&shown),
        "names the state directory: {stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {first_pid}")),
        "names the other process: {stderr}"
    );

    serves_a_request(&client, &id, "same-dir-1").await;
    assert_eq!(terminate(first).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_with_the_same_id_on_the_bus_refuses() {
    let server = NatsServer::start().await;
    let client = Controller::connect(&server.url()).await;
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = [
        "--nats-url",
        &server.url(),
        "--worker-id",
        "twin",
        "--model-dir",
        "models",
    ];
    let first = spawn_worker(state_a.path(), &args);
    // The worker answers service discovery once its service task has subscribed.
    answers_ping(&client.nats, "twin").await;

    let (code, stderr) = refused_worker("same id on the bus", state_b.path(), &args).await;
    assert_eq!(code, Some(EXIT_INSTANCE_CONFLICT), "{stderr}");
    assert!(stderr.contains("twin"), "names the id: {stderr}");
    assert!(
        stderr.contains(&format!("version {}", env!("CARGO_PKG_VERSION"))),
        "names the other instance's version: {stderr}"
    );

    // The first is untouched: it still answers.
    let ping = "$SRV.PING.mlx-worker.twin";
    within(
        "the first worker's PING answer",
        client.nats.request(ping, Bytes::new()),
    )
    .await
    .unwrap();
    assert_eq!(terminate(first).await, Some(0));
}

/// Waits until a worker answers the ping of `id` on `client`'s server.
async fn answers_ping(client: &async_nats::Client, id: &str) {
    let ping = format!("$SRV.PING.mlx-worker.{id}");
    within("the first worker to answer PING", async {
        while client.request(ping.clone(), Bytes::new()).await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_worker_account_may_ask_the_bus_about_its_id() {
    let (server, _account) = crate::privilege::least_privilege_server().await;
    let controller = async_nats::ConnectOptions::with_user_and_password(
        "controller".into(),
        "controller-pw".into(),
    )
    .connect(server.url())
    .await
    .unwrap();
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url = server.url();
    let args = [
        "--nats-url",
        &url,
        "--worker-id",
        "least",
        "--model-dir",
        "models",
    ];
    let as_worker = |state: &Path| {
        let mut command = worker_command(state, &args);
        command
            .env("MLX_WORKER_NATS_USER", "worker")
            .env("MLX_WORKER_NATS_PASSWORD", "worker-pw");
        command
    };
    let first = as_worker(state_a.path())
        .spawn()
        .expect("start the mlx-worker binary");
    answers_ping(&controller, "least").await;

    let (code, stderr) = refused("same id, least privilege", as_worker(state_b.path())).await;
    assert_eq!(code, Some(EXIT_INSTANCE_CONFLICT), "{stderr}");
    assert!(!stderr.contains("Permissions Violation"), "{stderr}");
    assert_eq!(terminate(first).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_embedded_worker_leaves_no_nats_server_behind_at_the_next_start() {
    let port = free_port();
    let _reap = ReapNatsServers(port);
    let state = tempfile::tempdir().unwrap();
    let port_arg = port.to_string();
    let embedded = [
        "--nats-mode",
        "embedded",
        "--nats-embedded-port",
        &port_arg,
        "--worker-id",
        "orphan-check",
        "--log-format",
        "json",
    ];
    let args = [&embedded[..], &SERVING_TINY].concat();
    let url = format!("nats://127.0.0.1:{port}");

    let mut first = spawn_worker(state.path(), &args);
    let first_pid = first.id().expect("running");
    // The controller's transport retries until the worker's own server is up.
    let client = Controller::connect(&url).await;
    client.heartbeat_where("orphan-check", |_| true).await;
    let orphan = match nats_servers_on(port)[..] {
        [pid] => pid,
        ref found => panic!("expected one nats-server on port {port}, found {found:?}"),
    };
    assert_eq!(parent_of(orphan), Some(first_pid));
    drop(client);
    send_signal(first_pid, "KILL");
    within("the killed worker to exit", first.wait())
        .await
        .unwrap();
    assert!(alive(orphan), "the killed worker's nats-server runs on");

    // The next start stops the orphan, says so, and starts a server of its own.
    let mut second = worker_command(state.path(), &args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the mlx-worker binary");
    let second_pid = second.id().expect("running");
    let mut lines = BufReader::new(second.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    within("the second worker to start", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            let message = event["fields"]["message"].as_str().unwrap_or("").to_owned();
            log.push(event);
            if message == "starting" {
                return;
            }
        }
        panic!("the second worker exited: {log:#?}");
    })
    .await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    assert!(
        log.iter().any(|e| e["level"] == "WARN"
            && e["fields"]["pid"] == orphan
            && e["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("orphaned embedded nats-server"))),
        "the worker logs that it stopped the orphan: {log:#?}"
    );
    assert!(
        !alive(orphan),
        "the orphaned nats-server {orphan} still runs"
    );
    let own = match nats_servers_on(port)[..] {
        [pid] => pid,
        ref found => panic!("expected one nats-server on port {port}, found {found:?}"),
    };
    assert_eq!(parent_of(own), Some(second_pid));

    let client = Controller::connect(&url).await;
    serves_a_request(&client, "orphan-check", "orphan-1").await;
    drop(client);
    assert_eq!(terminate(second).await, Some(0));
    assert_eq!(nats_servers_on(port), Vec::<u32>::new());
    assert!(
        !state.path().join("nats-server.pid").exists(),
        "a clean stop removes the record of the embedded server"
    );
}
