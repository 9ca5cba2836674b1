//! The worker's HTTP port: `GET /metrics` (Prometheus text), `GET /healthz` (alive) and
//! `GET /readyz` (takes work). A deliberately small HTTP/1.1 server: one request per
//! connection, `GET` only, request head capped in size and time, so a stray client or scanner
//! costs nothing. It reads the worker through an [`Observer`] and changes nothing.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::metrics::prometheus;
use crate::worker::Observer;

/// Largest request head read.
const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Time a client has to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
const CONNECTIONS_MAX: usize = 64;

/// Serves until `stop` fires.
pub async fn serve(listener: TcpListener, observer: Observer, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    let tasks = TaskTracker::new();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
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
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let observer = observer.clone();
                tasks.spawn(async move {
                    if let Err(e) = handle(stream, &observer).await {
                        debug!(cause = %e, "http connection ended");
                    }
                    drop(permit);
                });
            }
            Err(e) => debug!(cause = %e, "accept failed"),
        }
    }
    tasks.close();
    tasks.wait().await;
}

async fn handle(mut stream: TcpStream, observer: &Observer) -> std::io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
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
            let body = prometheus::render(&observer.metrics().await);
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
        if buf.len() > REQUEST_HEAD_BYTES_MAX {
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
