//! [`SimTransport`]: the worker's [`Transport`] over the simulated [`crate::Broker`], reached
//! through turmoil's TCP.
//!
//! One connection manager task per transport connects, resubscribes every live subscription
//! on each (re)connection, writes an outbox in order and reads the broker's frames. While the
//! link is down, publishes wait in the outbox up to `buffer_max` frames; past that, a publish
//! fails with [`TransportError::Disconnected`]. Frames handed to a link that turns out dead are
//! lost, as with NATS. A dead link is detected by pings: when nothing has been heard from the
//! broker for `ping_interval × pings_max_out`, the connection is dropped and redialled.
//!
//! Each subscription buffers at most [`SUBSCRIPTION_BUFFER`] messages, as async-nats' default
//! does; past that, a message is dropped and counted in [`SimTransport::slow_consumer_drops`]
//! (NATS's slow-consumer rule), never queued without bound.
//!
//! [`Transport::publish_if_listened`] works exactly as the production transport's: publish with
//! a reply subject in this connection's private inbox, publish a marker to the inbox, and since
//! the broker handles one connection's frames in order, a 503 "no responders" for the message
//! arrives before the marker.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use mlx_worker::limits::NATS_PAYLOAD_BYTES_MAX;
use mlx_worker::transport::{
    ConnectionState, InboundMessage, Subscription, Transport, TransportError,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use turmoil::net::TcpStream;

use crate::trace::{EventKind, Trace};
use crate::wire::{Frame, NO_RESPONDERS, read_frame, write_frames};

/// Longest wait for a listener check's marker or a flush's pong.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(5);

/// How a [`SimTransport`] behaves.
#[derive(Clone, Debug)]
pub struct SimTransportConfig {
    /// The broker's address, `host:port`.
    pub server: String,
    /// This client's name: its node in the trace and its private inbox.
    pub name: String,
    /// Time between pings.
    pub ping_interval: Duration,
    /// Ping intervals of silence after which the link is declared dead.
    pub pings_max_out: u32,
    /// Time between reconnection attempts.
    pub reconnect_delay: Duration,
    /// Frames kept while disconnected.
    pub buffer_max: usize,
    /// Delay before handling each inbound frame (a slow consumer).
    pub read_delay: Duration,
    /// Counts messages dropped because a subscription's buffer was full; shared, so that a
    /// world can add up every incarnation of a client.
    pub slow_consumer_drops: Arc<AtomicU64>,
}

impl SimTransportConfig {
    /// Defaults for a client named `name` of the broker at `server`.
    pub fn new(server: &str, name: &str) -> SimTransportConfig {
        SimTransportConfig {
            server: server.to_owned(),
            name: name.to_owned(),
            ping_interval: Duration::from_millis(100),
            pings_max_out: 3,
            reconnect_delay: Duration::from_millis(50),
            buffer_max: 1024,
            read_delay: Duration::ZERO,
            slow_consumer_drops: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// Messages one subscription buffers before it drops (async-nats' default capacity).
pub const SUBSCRIPTION_BUFFER: usize = 65_536;

struct SubEntry {
    subject: String,
    queue: Option<String>,
    tx: mpsc::Sender<InboundMessage>,
}

#[derive(Default)]
struct Inner {
    connected: bool,
    ever_connected: bool,
    closed: bool,
    outbox: VecDeque<Frame>,
    subs: BTreeMap<u64, SubEntry>,
    next_sid: u64,
    /// Listener checks: whether a 503 arrived, and who waits for the marker.
    checks: BTreeMap<u64, (bool, oneshot::Sender<bool>)>,
    next_check: u64,
    flushes: BTreeMap<u64, oneshot::Sender<()>>,
    next_flush: u64,
    last_heard: Option<Instant>,
}

struct Shared {
    config: SimTransportConfig,
    /// Delay before handling each inbound frame, microseconds (a slow consumer).
    read_delay_us: AtomicU64,
    trace: Trace,
    inbox: String,
    inner: Mutex<Inner>,
    wake_writer: Notify,
    state: watch::Sender<ConnectionState>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, kind: EventKind) {
        self.trace.record(&self.config.name, kind);
    }

    fn push(&self, frame: Frame) {
        self.lock().outbox.push_back(frame);
        self.wake_writer.notify_one();
    }
}

/// A client of the simulated broker.
pub struct SimTransport {
    shared: Arc<Shared>,
    manager: JoinHandle<()>,
}

impl Drop for SimTransport {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.manager.abort();
    }
}

impl SimTransport {
    /// Starts connecting in the background; the link state tells when it is up.
    pub fn connect(config: SimTransportConfig, trace: Trace) -> SimTransport {
        let inbox = format!("_INBOX.{}", config.name);
        let shared = Arc::new(Shared {
            read_delay_us: AtomicU64::new(
                u64::try_from(config.read_delay.as_micros()).unwrap_or(u64::MAX),
            ),
            config,
            trace,
            inbox,
            inner: Mutex::new(Inner {
                next_sid: 1,
                ..Inner::default()
            }),
            wake_writer: Notify::new(),
            state: watch::Sender::new(ConnectionState {
                connected: false,
                reconnects: 0,
            }),
        });
        let manager = tokio::spawn(manage(shared.clone()));
        SimTransport { shared, manager }
    }

    /// Handles each inbound frame this much later from now on (a slow consumer).
    pub fn set_read_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.shared.read_delay_us.store(us, Ordering::Relaxed);
    }

    /// Messages dropped so far because one of this transport's subscriptions had
    /// [`SUBSCRIPTION_BUFFER`] messages waiting.
    pub fn slow_consumer_drops(&self) -> u64 {
        self.shared
            .config
            .slow_consumer_drops
            .load(Ordering::Relaxed)
    }

    /// Publishes with a reply subject (a client's request with an inbox).
    pub fn publish_with_reply(&self, subject: String, reply: String, payload: Bytes) {
        self.shared.record(EventKind::Published {
            subject: subject.clone(),
            reply: Some(reply.clone()),
            payload: payload.clone(),
        });
        self.shared.push(Frame::Pub {
            subject,
            reply: Some(reply),
            payload: payload.to_vec(),
        });
    }

    fn enqueue_pub(
        &self,
        subject: String,
        reply: Option<String>,
        payload: Bytes,
        record: bool,
    ) -> Result<(), TransportError> {
        if payload.len() > NATS_PAYLOAD_BYTES_MAX {
            return Err(TransportError::PayloadTooLarge {
                len: payload.len(),
                limit: NATS_PAYLOAD_BYTES_MAX,
            });
        }
        {
            let mut inner = self.shared.lock();
            if inner.closed {
                return Err(TransportError::Closed);
            }
            if !inner.connected && inner.outbox.len() >= self.shared.config.buffer_max {
                drop(inner);
                self.shared.record(EventKind::PublishFailed { subject });
                return Err(TransportError::Disconnected);
            }
            inner.outbox.push_back(Frame::Pub {
                subject: subject.clone(),
                reply: reply.clone(),
                payload: payload.to_vec(),
            });
        }
        self.shared.wake_writer.notify_one();
        if record {
            self.shared.record(EventKind::Published {
                subject,
                reply,
                payload,
            });
        }
        Ok(())
    }
}

/// Connects, serves the link until it dies, waits, and again, until the transport is dropped.
async fn manage(shared: Arc<Shared>) {
    loop {
        if let Ok(stream) = TcpStream::connect(shared.config.server.as_str()).await {
            serve_link(&shared, stream).await;
        }
        tokio::time::sleep(shared.config.reconnect_delay).await;
    }
}

async fn serve_link(shared: &Arc<Shared>, stream: TcpStream) {
    let reconnects = {
        let mut inner = shared.lock();
        // Subscriptions are re-sent from the live set below; queued ones would be duplicates.
        inner
            .outbox
            .retain(|f| !matches!(f, Frame::Sub { .. } | Frame::Unsub { .. }));
        let mut hello = vec![
            Frame::Connect {
                name: shared.config.name.clone(),
            },
            Frame::Sub {
                sid: 0,
                subject: format!("{}.>", shared.inbox),
                queue: None,
            },
        ];
        for (&sid, sub) in &inner.subs {
            hello.push(Frame::Sub {
                sid,
                subject: sub.subject.clone(),
                queue: sub.queue.clone(),
            });
        }
        for f in hello.into_iter().rev() {
            inner.outbox.push_front(f);
        }
        inner.connected = true;
        #[allow(clippy::disallowed_methods)] // Virtual time inside the simulator.
        let now = Instant::now();
        inner.last_heard = Some(now);
        let reconnect = inner.ever_connected;
        inner.ever_connected = true;
        let mut reconnects = 0;
        shared.state.send_modify(|s| {
            if reconnect {
                s.reconnects += 1;
            }
            s.connected = true;
            reconnects = s.reconnects;
        });
        reconnects
    };
    shared.record(EventKind::Connected { reconnects });
    shared.wake_writer.notify_one();

    let (mut rd, mut wr) = stream.into_split();
    let writer = {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                let batch: Vec<Frame> = shared.lock().outbox.drain(..).collect();
                if batch.is_empty() {
                    shared.wake_writer.notified().await;
                    continue;
                }
                if write_frames(&mut wr, &batch).await.is_err() {
                    return;
                }
            }
        })
    };
    let reader = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Ok(frame) = read_frame(&mut rd).await {
                let delay = shared.read_delay_us.load(Ordering::Relaxed);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_micros(delay)).await;
                }
                on_frame(&shared, frame);
            }
        })
    };
    let dead_after = shared.config.ping_interval * shared.config.pings_max_out;
    loop {
        tokio::time::sleep(shared.config.ping_interval).await;
        if writer.is_finished() || reader.is_finished() {
            break;
        }
        let heard = shared.lock().last_heard;
        #[allow(clippy::disallowed_methods)] // Virtual time inside the simulator.
        let now = Instant::now();
        if heard.is_none_or(|h| now.saturating_duration_since(h) >= dead_after) {
            break;
        }
        shared.push(Frame::Ping { id: None });
    }
    writer.abort();
    reader.abort();
    let checks: Vec<u64> = {
        let mut inner = shared.lock();
        inner.connected = false;
        // Flushes and listener checks of this link can no longer be answered.
        inner.flushes.clear();
        let checks: Vec<u64> = inner.checks.keys().copied().collect();
        inner.checks.clear();
        let inbox = shared.inbox.clone();
        inner.outbox.retain(|f| match f {
            Frame::Pub { subject, reply, .. } => {
                !subject.starts_with(&inbox)
                    && !reply.as_deref().is_some_and(|r| r.starts_with(&inbox))
            }
            Frame::Ping { .. } => false,
            _ => true,
        });
        checks
    };
    let _ = checks;
    shared.state.send_modify(|s| s.connected = false);
    shared.record(EventKind::Disconnected);
}

fn on_frame(shared: &Shared, frame: Frame) {
    #[allow(clippy::disallowed_methods)] // Virtual time inside the simulator.
    let now = Instant::now();
    shared.lock().last_heard = Some(now);
    match frame {
        Frame::Ping { id } => shared.push(Frame::Pong { id }),
        Frame::Pong { id: Some(id) } => {
            if let Some(waiter) = shared.lock().flushes.remove(&id) {
                let _ = waiter.send(());
            }
        }
        Frame::Msg {
            sid: 0,
            subject,
            status,
            ..
        } => on_inbox(shared, &subject, status),
        Frame::Msg {
            sid,
            subject,
            reply,
            payload,
            ..
        } => {
            let tx = shared.lock().subs.get(&sid).map(|s| s.tx.clone());
            if let Some(tx) = tx {
                let payload = Bytes::from(payload);
                shared.record(EventKind::Received {
                    subject: subject.clone(),
                    payload: payload.clone(),
                });
                let message = InboundMessage {
                    subject,
                    reply,
                    payload,
                };
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(message) {
                    shared
                        .config
                        .slow_consumer_drops
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        _ => {}
    }
}

/// Resolves listener checks; see the module documentation.
fn on_inbox(shared: &Shared, subject: &str, status: Option<u16>) {
    let Some(rest) = subject.strip_prefix(&shared.inbox) else {
        return;
    };
    let mut inner = shared.lock();
    if let Some(n) = rest.strip_prefix(".a.").and_then(|n| n.parse::<u64>().ok()) {
        if status == Some(NO_RESPONDERS)
            && let Some(entry) = inner.checks.get_mut(&n)
        {
            entry.0 = true;
        }
    } else if let Some(n) = rest.strip_prefix(".m.").and_then(|n| n.parse::<u64>().ok())
        && let Some((no_responders, waiter)) = inner.checks.remove(&n)
    {
        let _ = waiter.send(!no_responders);
    }
}

/// A subscription's messages; dropping it unsubscribes.
struct SubStream {
    sid: u64,
    rx: mpsc::Receiver<InboundMessage>,
    shared: Arc<Shared>,
}

impl Stream for SubStream {
    type Item = InboundMessage;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<InboundMessage>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for SubStream {
    fn drop(&mut self) {
        let connected = {
            let mut inner = self.shared.lock();
            inner.subs.remove(&self.sid);
            inner.connected
        };
        if connected {
            self.shared.push(Frame::Unsub { sid: self.sid });
        }
    }
}

#[async_trait]
impl Transport for SimTransport {
    async fn publish(&self, subject: String, payload: Bytes) -> Result<(), TransportError> {
        self.enqueue_pub(subject, None, payload, true)
    }

    async fn publish_if_listened(
        &self,
        subject: String,
        payload: Bytes,
    ) -> Result<bool, TransportError> {
        let (tx, rx) = oneshot::channel();
        let n = {
            let mut inner = self.shared.lock();
            let n = inner.next_check;
            inner.next_check += 1;
            inner.checks.insert(n, (false, tx));
            n
        };
        let inbox = &self.shared.inbox;
        let reply = format!("{inbox}.a.{n}");
        // Recorded only once it is known to have been delivered: a check nobody answered left
        // no trace at the broker either.
        let sent = self
            .enqueue_pub(subject.clone(), Some(reply.clone()), payload.clone(), false)
            .and_then(|()| self.enqueue_pub(format!("{inbox}.m.{n}"), None, Bytes::new(), false));
        let outcome = match sent {
            Err(err) => Err(err),
            Ok(()) => match tokio::time::timeout(ROUND_TRIP_TIMEOUT, rx).await {
                Ok(Ok(delivered)) => Ok(delivered),
                Ok(Err(_)) => Err(TransportError::Disconnected),
                Err(_) => Err(TransportError::TimedOut {
                    millis: mlx_worker::clock::millis(ROUND_TRIP_TIMEOUT),
                }),
            },
        };
        self.shared.lock().checks.remove(&n);
        match outcome {
            Ok(true) => self.shared.record(EventKind::Published {
                subject,
                reply: Some(reply),
                payload,
            }),
            Ok(false) => {}
            Err(_) => self.shared.record(EventKind::PublishFailed { subject }),
        }
        outcome
    }

    async fn subscribe(
        &self,
        subject: String,
        queue_group: Option<String>,
    ) -> Result<Subscription, TransportError> {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let sid = {
            let mut inner = self.shared.lock();
            if inner.closed {
                return Err(TransportError::Closed);
            }
            let sid = inner.next_sid;
            inner.next_sid += 1;
            inner.subs.insert(
                sid,
                SubEntry {
                    subject: subject.clone(),
                    queue: queue_group.clone(),
                    tx,
                },
            );
            if inner.connected {
                inner.outbox.push_back(Frame::Sub {
                    sid,
                    subject,
                    queue: queue_group,
                });
            }
            sid
        };
        self.shared.wake_writer.notify_one();
        Ok(Subscription::new(SubStream {
            sid,
            rx,
            shared: self.shared.clone(),
        }))
    }

    async fn flush(&self) -> Result<(), TransportError> {
        round_trip(&self.shared).await
    }

    fn connection(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.subscribe()
    }
}

/// A ping the broker answers after everything sent before it: a flush.
async fn round_trip(shared: &Shared) -> Result<(), TransportError> {
    {
        let (tx, rx) = oneshot::channel();
        {
            let mut inner = shared.lock();
            if !inner.connected {
                return Err(TransportError::Disconnected);
            }
            let id = inner.next_flush;
            inner.next_flush += 1;
            inner.flushes.insert(id, tx);
            inner.outbox.push_back(Frame::Ping { id: Some(id) });
        }
        shared.wake_writer.notify_one();
        match tokio::time::timeout(ROUND_TRIP_TIMEOUT, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(TransportError::Disconnected),
            Err(_) => Err(TransportError::TimedOut {
                millis: mlx_worker::clock::millis(ROUND_TRIP_TIMEOUT),
            }),
        }
    }
}
