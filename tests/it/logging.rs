// Goal: with `logging.file` set, the worker's log lines go to that file; text logs carry no
// colour codes into a file or a pipe; a log file that cannot be opened stops start-up with
// exit 64 and a message naming the path and the key.
// Method: the real binary, started so that it logs and then stops by itself with nothing
// else running: its message server is unreachable (a warning, then retries in the
// background) and its Python interpreter is missing (an error, exit 69). Once with
// `logging.file` in its configuration file, once with its stderr piped, once with a log file
// in a directory that does not exist.

use std::path::Path;

use testkit::*;

/// What the worker logs on its way to exit 69 (see the method above).
const UNREACHABLE: &str = "message server unreachable, retrying in the background";
const NO_PYTHON: &str = "python interpreter /nonexistent/python not found";

/// A server URL on which nothing listens: a port the system just handed out and took back.
fn unreachable_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("nats://127.0.0.1:{port}")
}

/// Runs the worker with `yaml` as its configuration file, until it exits by itself.
async fn run_with(dir: &Path, yaml: &str) -> Exited {
    let config = dir.join("cluster.yaml");
    std::fs::write(&config, yaml).unwrap();
    let url = unreachable_url();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--nats-url",
        &url,
        "--python",
        "/nonexistent/python",
    ];
    // Text logs, whatever the environment asks for.
    run_until_exit(
        &worker_binary!(),
        "no runtime",
        &args,
        &[("RUST_LOG", "info")],
    )
    .await
}

#[tokio::test]
async fn log_lines_go_to_logging_file_without_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    // Appended to, never truncated.
    std::fs::write(&log, "an earlier line\n").unwrap();
    let yaml = format!("logging:\n  format: text\n  file: {}\n", log.display());
    let exited = run_with(dir.path(), &yaml).await;
    assert_eq!(exited.code, Some(69), "{}", exited.stderr);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("an earlier line\n"), "{text}");
    assert!(text.contains(UNREACHABLE), "{text}");
    assert!(text.contains(NO_PYTHON), "{text}");
    assert!(
        !text.contains("\x1b["),
        "colour codes in the file: {text:?}"
    );
    // The file takes the log lines instead of stderr.
    assert!(!exited.stderr.contains(NO_PYTHON), "{}", exited.stderr);
}

#[tokio::test]
async fn text_logs_on_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let exited = run_with(dir.path(), "logging:\n  format: text\n").await;
    assert_eq!(exited.code, Some(69), "{}", exited.stderr);
    assert!(exited.stderr.contains(UNREACHABLE), "{}", exited.stderr);
    assert!(exited.stderr.contains(NO_PYTHON), "{}", exited.stderr);
    assert!(
        !exited.stderr.contains("\x1b["),
        "colour codes on a pipe: {:?}",
        exited.stderr
    );
}

#[tokio::test]
async fn a_log_file_that_cannot_be_opened_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("no-such-dir").join("worker.log");
    let yaml = format!("logging:\n  file: {}\n", log.display());
    let exited = run_with(dir.path(), &yaml).await;
    assert_eq!(exited.code, Some(64), "{}", exited.stderr);
    let message = exited.stderr.trim();
    assert!(message.contains(&log.display().to_string()), "{message}");
    assert!(message.contains("logging.file"), "{message}");
    // It stopped before anything else: nothing was logged.
    assert!(!message.contains(UNREACHABLE), "{message}");
}
