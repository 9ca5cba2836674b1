//! The anchor of the batching figures: `mlx_lm.server`, the HTTP server of the MLX library the
//! runtime is built on, run from the project's venv on the same model with the same batch size,
//! and a client for its OpenAI-compatible streaming completions.
//!
//! The client is plain HTTP/1.0 over a TCP stream: the server answers each request on its own
//! connection and ends the body by closing it, so reading lines is all a client needs.

use std::io;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::batching::Sample;
use crate::harness::{Sampling, repo};

/// Longest the server has to answer its health check once started (it imports MLX first).
const READY_WITHIN: Duration = Duration::from_secs(120);
/// How often the health check is asked while the server starts.
const READY_POLL: Duration = Duration::from_millis(50);
/// The longest response line the client reads; an event carries one piece of text.
const LINE_BYTES_MAX: u64 = 64 * 1024;
/// Lines of the server's stderr shown when it fails to start or the bench panics.
const LOG_LINES_SHOWN: usize = 40;
/// Times a request is sent again after its connection was reset before any answer.
const RESETS_MAX: u32 = 8;

/// How the anchor runs: the batch it decodes and the prompt chunk it prefills.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AnchorSettings {
    /// `--decode-concurrency`: the streams decoded together.
    pub(crate) decode_concurrency: usize,
    /// `--prefill-step-size`: prompt tokens prefilled per step.
    pub(crate) prefill_step_size: usize,
}

/// The server's arguments after the interpreter, `model` and `port` as given.
pub(crate) fn server_args(settings: AnchorSettings, model: &str, port: &str) -> Vec<String> {
    [
        "-m",
        "mlx_lm",
        "server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--decode-concurrency",
        &settings.decode_concurrency.to_string(),
        "--prefill-step-size",
        &settings.prefill_step_size.to_string(),
        // The runtime keeps no prompt cache; neither does the anchor, so that a prompt seen in
        // an earlier round is prefilled again on both.
        "--prompt-cache-size",
        "0",
        "--log-level",
        "WARNING",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A running `mlx_lm.server`. Dropping it, at the end or while a panic unwinds, kills it.
pub(crate) struct AnchorServer {
    child: Child,
    port: u16,
    /// Its stderr (warnings and a line per request), shown when it fails to start.
    log: tempfile::NamedTempFile,
}

impl AnchorServer {
    /// Starts the server on the model directory `model` and waits until its health check
    /// answers; the error says why it did not.
    pub(crate) async fn start(
        model: &Path,
        settings: AnchorSettings,
    ) -> Result<AnchorServer, String> {
        let port = free_port()?;
        let args = server_args(settings, &model.to_string_lossy(), &port.to_string());
        let log = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        let stderr = log.reopen().map_err(|e| e.to_string())?;
        let child = Command::new(repo(".venv/bin/python"))
            .args(&args)
            // Everything is local: nothing may be fetched from a model hub.
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("mlx_lm.server did not start: {e}"))?;
        // From here the guard owns the process: an early return kills it.
        let mut server = AnchorServer { child, port, log };
        if let Err(why) = server.wait_ready().await {
            return Err(format!("{why}; its last words:\n{}", server.last_words()));
        }
        Ok(server)
    }

    /// Asks the health check until it answers, the process ends, or [`READY_WITHIN`] passes.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!(
                    "mlx_lm.server exited before it was ready ({status})"
                ));
            }
            // Not answering yet, answering 200, or (503) its generation thread has failed,
            // as it does when the model does not load.
            match health(self.port).await {
                None => {}
                Some(200) => return Ok(()),
                Some(status) => {
                    return Err(format!("mlx_lm.server's health check answered {status}"));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "mlx_lm.server did not answer its health check within {READY_WITHIN:?}"
                ));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// The last lines of its stderr.
    fn last_words(&self) -> String {
        let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        let mut tail: Vec<&str> = log.lines().rev().take(LOG_LINES_SHOWN).collect();
        tail.reverse();
        tail.join("\n")
    }

    /// The port it listens on, on the loopback address.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for AnchorServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("mlx_lm.server's last words:\n{}", self.last_words());
        }
        // It holds nothing that needs a clean exit.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The version of mlx-lm in the venv, or why it is not known.
pub(crate) async fn version() -> String {
    let out = tokio::process::Command::new(repo(".venv/bin/python"))
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('mlx-lm'))",
        ])
        .output()
        .await;
    match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(out) => format!(
            "(version unknown: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("(version unknown: {e})"),
    }
}

/// A loopback port free a moment ago.
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// The status of `GET /health`, or `None` when nothing answers yet.
async fn health(port: u16) -> Option<u16> {
    let request = b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    let (line, _) = send(port, request, READY_WITHIN).await.ok()?;
    status(&line)
}

/// Sends `request` (head and body) on a new connection; its status line, and the rest of the
/// response to read. Waits at most `patience` for the status line.
async fn send(
    port: u16,
    request: &[u8],
    patience: Duration,
) -> io::Result<(String, BufReader<TcpStream>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(request).await?;
    let mut reader = BufReader::new(stream);
    let line = next_line(&mut reader, patience).await?;
    Ok((line.ok_or(io::ErrorKind::UnexpectedEof)?, reader))
}

/// The status code of an HTTP status line.
fn status(line: &str) -> Option<u16> {
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The next line, without its line ending; `None` at the end of the body.
async fn next_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    patience: Duration,
) -> io::Result<Option<String>> {
    let mut line = String::new();
    let read = tokio::time::timeout(patience, reader.take(LINE_BYTES_MAX).read_line(&mut line))
        .await
        .map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, format!("no line in {patience:?}"))
        })??;
    Ok((read > 0).then(|| line.trim_end_matches(['\r', '\n']).to_owned()))
}

/// Whether `e` is the server dropping a connection before it answered.
fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
    )
}

/// One streamed completion of `prompt`, as its client sees it: when the request went out,
/// when each piece of text arrived, and the tokens the server generated (its `usage`). Waits
/// at most `patience` for any one line; panics on anything but a whole, successful stream.
pub(crate) async fn completion(
    port: u16,
    prompt: &str,
    max_tokens: u32,
    sampling: Sampling,
    patience: Duration,
) -> Sample {
    let body = json!({
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p.unwrap_or(1.0),
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let sent = Instant::now();
    // The server listens with a backlog of 5 (Python's socketserver default): in a burst beyond
    // it, the kernel may reset a connection before any answer. Such a request is sent again at
    // once, counted, and timed from its first attempt.
    let mut resets = 0;
    let (first, mut reader) = loop {
        match send(port, request.as_bytes(), patience).await {
            Ok(answered) => break answered,
            Err(e) if resets < RESETS_MAX && is_reset(&e) => resets += 1,
            Err(e) => panic!("mlx_lm.server did not answer: {e}"),
        }
    };
    assert_eq!(status(&first), Some(200), "{first}");
    let mut sample = Sample {
        sent,
        arrivals: Vec::new(),
        tokens: None,
        resets,
    };
    let mut done = false;
    while let Some(line) = next_line(&mut reader, patience).await.unwrap() {
        // Headers, keep-alive comments and the blank lines between events carry no data.
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let at = Instant::now();
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let event: Value = serde_json::from_str(data).unwrap();
        let text = event["choices"][0]["text"].as_str().unwrap_or("");
        if !text.is_empty() {
            sample.arrivals.push(at);
        }
        if let Some(tokens) = event["usage"]["completion_tokens"].as_u64() {
            sample.tokens = Some(tokens);
        }
    }
    assert!(
        done && sample.tokens.is_some(),
        "the stream ended without its usage and [DONE]"
    );
    sample
}
