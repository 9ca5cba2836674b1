//! The worker's HTTP port: `GET /metrics` (Prometheus text), `GET /healthz` (alive) and
//! `GET /readyz` (takes work). A deliberately small HTTP/1.1 server: one request per
//! connection, `GET` only, request head capped in size and time, so a stray client or scanner
//! costs nothing. It reads the worker through an [`Observer`] and changes nothing.

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backoff::{self, Backoff};
use crate::limits::{
    HTTP_ACCEPT_BACKOFF_MAX, HTTP_ACCEPT_BACKOFF_MIN, HTTP_CONNECTIONS_MAX,
    HTTP_REQUEST_HEAD_BYTES_MAX, HTTP_REQUEST_TIMEOUT,
};
use crate::metrics::prometheus;
use crate::worker::Observer;

/// Serves until `stop` fires.
pub async fn serve(listener: TcpListener, observer: Observer, stop: CancellationToken) {
    let seed = match listener.local_addr() {
        Ok(addr) => {
            info!(%addr, "serving /metrics, /healthz and /readyz");
            backoff::seed(addr)
        }
        Err(_) => 0,
    };
    let tasks = TaskTracker::new();
    accept_loop(&listener, seed, &stop, |stream, permit| {
        let observer = observer.clone();
        tasks.spawn(async move {
            if let Err(e) = handle(stream, &observer).await {
                debug!(cause = %e, "http connection ended");
            }
            drop(permit);
        });
    })
    .await;
    tasks.close();
    tasks.wait().await;
}

/// Where connections come from: the listener, or a stand-in that fails on demand.
trait Accept {
    /// One accepted connection.
    type Stream;
    /// Waits for the next connection.
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;

    async fn accept(&self) -> std::io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(stream, _)| stream)
    }
}

/// Accepts connections until `stop` fires, at most [`HTTP_CONNECTIONS_MAX`] at once, and hands each
/// to `serve` with its slot, which frees when dropped. While accepting fails it backs off,
/// jittered by `seed`.
async fn accept_loop<A: Accept>(
    acceptor: &A,
    seed: u64,
    stop: &CancellationToken,
    mut serve: impl FnMut(A::Stream, OwnedSemaphorePermit),
) {
    let slots = Arc::new(Semaphore::new(HTTP_CONNECTIONS_MAX));
    let mut failures = AcceptFailures::new(seed);
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = acceptor.accept() => accepted,
        };
        match accepted {
            Ok(stream) => {
                failures.end_burst();
                serve(stream, permit);
            }
            Err(e) => {
                let Some(wait) = failures.failed(&e) else {
                    continue;
                };
                drop(permit);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Accept failures in a row: how long to wait before the next attempt, and what to log.
struct AcceptFailures {
    /// The waits; its attempt count is the number of failures in the current burst.
    backoff: Backoff,
}

impl AcceptFailures {
    fn new(seed: u64) -> AcceptFailures {
        AcceptFailures {
            backoff: Backoff::new(HTTP_ACCEPT_BACKOFF_MIN, HTTP_ACCEPT_BACKOFF_MAX, seed),
        }
    }

    /// The wait before the next accept after `err`, or `None` when the next may follow at once.
    ///
    /// A connection that failed before it was accepted says nothing about the listener. Any
    /// other failure (no file descriptors or memory left) repeats until something is freed,
    /// so the loop waits, longer each time; only the first failure of a burst is logged.
    fn failed(&mut self, err: &std::io::Error) -> Option<Duration> {
        use std::io::ErrorKind;
        if matches!(
            err.kind(),
            ErrorKind::ConnectionAborted
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionRefused
        ) {
            debug!(cause = %err, "a connection failed before it was accepted");
            return None;
        }
        let wait = self.backoff.next_delay().unwrap_or(HTTP_ACCEPT_BACKOFF_MAX);
        if self.backoff.attempts() == 1 {
            warn!(
                cause = %err,
                wait_max_ms = crate::clock::millis(HTTP_ACCEPT_BACKOFF_MAX),
                "accepting http connections fails; waiting longer between attempts until it works"
            );
        }
        Some(wait)
    }

    /// An accept succeeded: the next failure starts a new burst, from the first wait.
    fn end_burst(&mut self) {
        let failures = self.backoff.attempts();
        if failures > 0 {
            info!(failures, "accepting http connections again");
            self.backoff.reset();
        }
    }
}

async fn handle(mut stream: TcpStream, observer: &Observer) -> std::io::Result<()> {
    let head = match tokio::time::timeout(HTTP_REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => {
            return respond(&mut stream, 431, "text/plain", "request head too large\n").await;
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return respond(&mut stream, 408, "text/plain", "request timeout\n").await,
    };
    let mut parts = head.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    match path {
        "/metrics" => {
            let body = prometheus::render(&observer.metrics());
            respond(&mut stream, 200, prometheus::CONTENT_TYPE, &body).await
        }
        "/healthz" if observer.is_alive() => respond(&mut stream, 200, "text/plain", "ok\n").await,
        "/healthz" => respond(&mut stream, 503, "text/plain", "stopped\n").await,
        "/readyz" if observer.is_ready() => {
            respond(&mut stream, 200, "text/plain", "ready\n").await
        }
        "/readyz" => respond(&mut stream, 503, "text/plain", "not ready\n").await,
        _ => respond(&mut stream, 404, "text/plain", "not found\n").await,
    }
}

/// Reads up to the end of the request head; `None` when it exceeds the cap.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() > HTTP_REQUEST_HEAD_BYTES_MAX {
            return Ok(None);
        }
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
