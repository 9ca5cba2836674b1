//! [`NatsTransport`]: the production [`Transport`] over async-nats.
//!
//! This is the only module that imports `async_nats`. It owns the client's options (server
//! list, name, credentials, ping interval, reconnect backoff, subscription capacity), turns the
//! client's events into [`ConnectionState`] updates (and notes when the client gave up
//! reconnecting, after `nats.maxReconnectAttempts` failed attempts: the link is then gone for
//! good and the subscriptions end), and implements the listener check of
//! [`Transport::publish_if_listened`] with NATS's no-responders status:
//!
//! 1. publish the message with a reply subject `<inbox>.a.<n>` in this connection's private
//!    inbox; when nobody subscribes to its subject, the server drops it and answers the reply
//!    subject at once with status 503;
//! 2. publish an empty marker to `<inbox>.m.<n>`, which this connection itself subscribes to;
//! 3. the server handles one connection's messages in order and writes to one subscription in
//!    order, so once the marker arrives, a 503 for step 1 — if there was one — has already
//!    arrived. Cost: one server round trip, no guessing with timers.

#[cfg(test)]
mod tests;

mod jetstream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::{ClientError, ConnectErrorKind, ConnectOptions, Event, StatusCode, rustls};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::{
    ConnectionState, InboundMessage, PartialPublish, Subscription, Transport, TransportError,
};
use crate::backoff::Backoff;
use crate::config::{NatsAuth, NatsConfig};
use crate::limits::{
    LISTENER_CHECK_TIMEOUT, NATS_CONNECT_TIMEOUT, NATS_PAYLOAD_BYTES_MAX, NATS_RECONNECT_DELAY_MIN,
    SUBSCRIPTION_CAPACITY,
};

/// Why the transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server rejected the credentials.
    #[error("the message server at {servers} rejected the credentials: {reason}")]
    Rejected {
        /// The configured servers.
        servers: String,
        /// The client's words.
        reason: String,
    },
    /// The TLS handshake failed: the server's certificate is not trusted, or the server
    /// refused the worker's client certificate (or its absence). Retrying cannot fix either.
    #[error("the TLS handshake with the message server at {servers} failed: {reason}")]
    TlsHandshake {
        /// The configured servers.
        servers: String,
        /// What was refused, and the TLS library's words.
        reason: String,
    },
    /// The configuration cannot be used (bad URL, TLS setup).
    #[error("cannot connect to {servers}: {reason}")]
    Invalid {
        /// The configured servers.
        servers: String,
        /// The client's words.
        reason: String,
    },
}

/// Pending listener checks, by number: whether a 503 arrived, and who waits for the marker.
type Pending = Arc<Mutex<HashMap<u64, (bool, oneshot::Sender<bool>)>>>;

/// A NATS connection.
pub struct NatsTransport {
    client: async_nats::Client,
    /// Receives the state the event callback publishes.
    state: watch::Receiver<ConnectionState>,
    /// This connection's private inbox prefix (`_INBOX.<nuid>`), for listener checks.
    inbox: String,
    /// Numbers listener checks.
    next_check: AtomicU64,
    /// Listener checks waiting for their marker; shared with the inbox reader task.
    pending: Pending,
    /// The inbox reader task; aborted when the transport is dropped.
    reader: JoinHandle<()>,
    /// Set by the event callback when the client gave up reconnecting.
    gave_up: Arc<AtomicBool>,
}

impl NatsTransport {
    /// Connects to the configured servers.
    ///
    /// A server that cannot be reached is not an error: the transport then keeps trying in
    /// the background and reports `connected: false` until it succeeds. Rejected credentials,
    /// a failed TLS handshake and unusable settings are errors, since retrying cannot fix them.
    pub async fn connect(config: &NatsConfig) -> Result<NatsTransport, ConnectError> {
        let servers = config.servers.join(",");
        let (state_tx, state) = watch::channel(ConnectionState {
            connected: false,
            reconnects: 0,
        });
        let state_tx = Arc::new(state_tx);
        let gave_up = Arc::new(AtomicBool::new(false));
        let events = Events {
            state_tx,
            gave_up: gave_up.clone(),
            client: Arc::default(),
            move_on_lame_duck: config.servers.len() > 1,
        };
        let connected_client = events.client.clone();
        let attempt = tokio::time::timeout(
            NATS_CONNECT_TIMEOUT,
            options(config, events.clone())
                .await?
                .connect(config.servers.clone()),
        )
        .await;
        let client = match attempt {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => match err.kind() {
                ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                    return Err(ConnectError::Rejected {
                        servers,
                        reason: err.to_string(),
                    });
                }
                ConnectErrorKind::ServerParse | ConnectErrorKind::Tls => {
                    return Err(ConnectError::Invalid {
                        servers,
                        reason: err.to_string(),
                    });
                }
                // The client reports a failed handshake as an I/O error; only the TLS error
                // inside it tells it from a server that is merely down.
                _ => match tls_failure(&err) {
                    Some(tls) => {
                        return Err(ConnectError::TlsHandshake {
                            servers,
                            reason: describe_tls_failure(tls),
                        });
                    }
                    None => retry_in_background(config, events, &servers, &err.to_string()).await?,
                },
            },
            Err(_) => retry_in_background(config, events, &servers, "timed out").await?,
        };
        let _ = connected_client.set(client.clone());
        let inbox = client.new_inbox();
        let pending: Pending = Arc::default();
        let inbox_sub =
            client
                .subscribe(format!("{inbox}.>"))
                .await
                .map_err(|e| ConnectError::Invalid {
                    servers: servers.clone(),
                    reason: format!("cannot subscribe to the private inbox: {e}"),
                })?;
        let reader = tokio::spawn(read_inbox(inbox_sub, inbox.clone(), pending.clone()));
        Ok(NatsTransport {
            client,
            state,
            inbox,
            next_check: AtomicU64::new(0),
            pending,
            reader,
            gave_up,
        })
    }

    /// Sends a request on `subject` and waits up to `timeout` for the first answer:
    /// `Ok(Some(payload))`, or `Ok(None)` when nobody subscribes to the subject (the server's
    /// no-responders status). Used at start-up, outside the [`Transport`] seam the worker core
    /// speaks through.
    pub async fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Option<Bytes>, TransportError> {
        use async_nats::RequestErrorKind;
        self.check_size(payload.len())?;
        let request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        match self.client.send_request(subject, request).await {
            Ok(answer) => Ok(Some(answer.payload)),
            Err(err) => match err.kind() {
                RequestErrorKind::NoResponders => Ok(None),
                RequestErrorKind::TimedOut => Err(TransportError::TimedOut {
                    millis: crate::clock::millis(timeout),
                }),
                RequestErrorKind::InvalidSubject
                | RequestErrorKind::MaxPayloadExceeded
                | RequestErrorKind::Other => Err(TransportError::Refused {
                    reason: err.to_string(),
                }),
            },
        }
    }

    /// Whether the client gave up reconnecting (its `nats.maxReconnectAttempts` attempts
    /// failed): the link is gone for good and every subscription has ended.
    pub fn gave_up_reconnecting(&self) -> bool {
        self.gave_up.load(Ordering::Relaxed)
    }

    fn check_size(&self, len: usize) -> Result<(), TransportError> {
        let server = self.client.max_payload();
        let limit = if server == 0 {
            NATS_PAYLOAD_BYTES_MAX
        } else {
            server.min(NATS_PAYLOAD_BYTES_MAX)
        };
        if len > limit {
            return Err(TransportError::PayloadTooLarge { len, limit });
        }
        Ok(())
    }
}

impl Drop for NatsTransport {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The TLS error behind a connect error, if the TLS handshake is what failed.
///
/// The client wraps it in a `std::io::Error`, whose `source()` skips the wrapped error itself,
/// so each I/O error in the chain is opened with `get_ref`.
fn tls_failure<'e>(err: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = e.source();
    }
    None
}

/// Says which side refused the handshake, and what to check.
fn describe_tls_failure(err: &rustls::Error) -> String {
    use rustls::AlertDescription as Alert;
    match err {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            format!("the server's certificate is not trusted (check nats.tls.caFile): {err}")
        }
        rustls::Error::AlertReceived(
            Alert::BadCertificate
            | Alert::CertificateRequired
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::UnsupportedCertificate
            | Alert::UnknownCA
            | Alert::NoCertificate
            | Alert::AccessDenied,
        ) => format!(
            "the server refused the client certificate or its absence \
             (check nats.tls.certFile and nats.tls.keyFile): {err}"
        ),
        _ => err.to_string(),
    }
}

async fn retry_in_background(
    config: &NatsConfig,
    events: Events,
    servers: &str,
    reason: &str,
) -> Result<async_nats::Client, ConnectError> {
    warn!(
        servers,
        reason, "message server unreachable, retrying in the background"
    );
    options(config, events)
        .await?
        .retry_on_initial_connect()
        .connect(config.servers.clone())
        .await
        .map_err(|e| ConnectError::Invalid {
            servers: servers.to_owned(),
            reason: e.to_string(),
        })
}

/// Where the client's events go.
#[derive(Clone)]
struct Events {
    /// The state the transport reports.
    state_tx: Arc<watch::Sender<ConnectionState>>,
    /// Set once the client gives up reconnecting.
    gave_up: Arc<AtomicBool>,
    /// The client, once connected: a server in lame duck mode makes it move to another.
    client: Arc<OnceLock<async_nats::Client>>,
    /// Whether there are other servers to move to (more than one configured).
    move_on_lame_duck: bool,
}

async fn options(config: &NatsConfig, events: Events) -> Result<ConnectOptions, ConnectError> {
    let mut options = ConnectOptions::new()
        .name(&config.name)
        .ping_interval(config.ping_interval)
        .connection_timeout(NATS_CONNECT_TIMEOUT)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .max_reconnects(config.max_reconnect_attempts)
        .reconnect_delay_callback({
            let backoff = reconnect_backoff(config.reconnect_wait_max, rand::random());
            move |attempts| backoff.delay(u32::try_from(attempts).unwrap_or(u32::MAX))
        })
        .event_callback({
            let ever_connected = Arc::new(AtomicBool::new(false));
            move |event| {
                let events = events.clone();
                let ever_connected = ever_connected.clone();
                async move { on_event(&events, &ever_connected, event) }
            }
        });
    match &config.auth {
        NatsAuth::None => {}
        NatsAuth::UserPassword { user, password } => {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        NatsAuth::Token(token) => options = options.token(token.expose().to_owned()),
        NatsAuth::NKey(seed) => options = options.nkey(seed.expose().to_owned()),
        NatsAuth::CredsFile(path) => {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| ConnectError::Invalid {
                    servers: config.servers.join(","),
                    reason: format!("credentials file {}: {e}", path.display()),
                })?;
        }
    }
    let tls = &config.tls;
    if tls.required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &tls.client_cert {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

/// The reconnect delays: the client counts attempts from 1, and the first waits up to 100 ms
/// (less when `max` is lower), doubling up to `max`. The seed is drawn per connection, so a
/// fleet that lost its server at once does not come back in step.
fn reconnect_backoff(max: Duration, seed: u64) -> Backoff {
    Backoff::new(NATS_RECONNECT_DELAY_MIN.min(max), max, seed)
}

/// The longest the client waits between reconnect attempts in all before it gives up, when
/// `nats.maxReconnectAttempts` limits them (`None` when it reconnects forever): the sum of the
/// attempts' delay caps. The attempts themselves come on top: a server that is down refuses
/// at once, one that does not answer takes up to [`NATS_CONNECT_TIMEOUT`] per attempt.
pub fn reconnect_wait_max(config: &NatsConfig) -> Option<Duration> {
    let attempts = config.max_reconnect_attempts?;
    Some(reconnect_wait_total(attempts, config.reconnect_wait_max))
}

/// The sum of the delay caps of attempts `1..=attempts` with the bound `max`.
fn reconnect_wait_total(attempts: usize, max: Duration) -> Duration {
    let backoff = reconnect_backoff(max, 0);
    let mut total = Duration::ZERO;
    for attempt in 1..=attempts {
        let cap = backoff.cap(u32::try_from(attempt).unwrap_or(u32::MAX));
        if cap == max {
            // From here on every attempt waits up to the bound.
            let left = u32::try_from(attempts - attempt + 1).unwrap_or(u32::MAX);
            return total.saturating_add(max.saturating_mul(left));
        }
        total += cap;
    }
    total
}

fn on_event(events: &Events, ever_connected: &AtomicBool, event: Event) {
    let state_tx = &events.state_tx;
    match event {
        Event::Connected => {
            // The first connection is not a reconnect.
            let reconnect = ever_connected.swap(true, Ordering::Relaxed);
            state_tx.send_modify(|s| {
                if reconnect {
                    s.reconnects += 1;
                }
                s.connected = true;
            });
            info!("connected to the message server");
        }
        Event::Disconnected => {
            state_tx.send_modify(|s| s.connected = false);
            warn!("disconnected from the message server");
        }
        Event::Closed => {
            state_tx.send_modify(|s| s.connected = false);
            info!("connection to the message server closed");
        }
        Event::LameDuckMode => match events.client.get() {
            // Leave before the server closes the connection: another server of the cluster
            // takes it (the one going away accepts no new clients), and the worker's
            // subscriptions, pulls and registration follow as after any reconnect.
            Some(client) if events.move_on_lame_duck => {
                warn!("message server entered lame duck mode; moving to another server");
                let client = client.clone();
                tokio::spawn(async move {
                    if let Err(err) = client.force_reconnect().await {
                        warn!(cause = %err, "cannot move off the server in lame duck mode");
                    }
                });
            }
            _ => warn!(
                "message server entered lame duck mode; staying until it closes the \
                 connection (no other server is configured)"
            ),
        },
        Event::SlowConsumer(sid) => warn!(sid, "slow consumer: a subscription dropped messages"),
        Event::ServerError(err) => warn!(cause = %err, "message server error"),
        Event::ClientError(ClientError::MaxReconnects) => {
            events.gave_up.store(true, Ordering::Relaxed);
            error!("gave up reconnecting to the message server (nats.maxReconnectAttempts)");
        }
        Event::ClientError(err) => warn!(cause = %err, "message client error"),
        Event::Draining => debug!("connection draining"),
    }
}

/// Resolves listener checks from the private inbox; see the module documentation.
async fn read_inbox(mut sub: async_nats::Subscriber, inbox: String, pending: Pending) {
    let answers = format!("{inbox}.a.");
    let markers = format!("{inbox}.m.");
    while let Some(msg) = sub.next().await {
        let subject = msg.subject.as_str();
        if let Some(n) = subject
            .strip_prefix(&answers)
            .and_then(|n| n.parse::<u64>().ok())
        {
            if msg.status == Some(StatusCode::NO_RESPONDERS)
                && let Ok(mut map) = pending.lock()
                && let Some(entry) = map.get_mut(&n)
            {
                entry.0 = true;
            }
        } else if let Some(n) = subject
            .strip_prefix(&markers)
            .and_then(|n| n.parse::<u64>().ok())
        {
            let entry = pending.lock().ok().and_then(|mut map| map.remove(&n));
            if let Some((no_responders, waiter)) = entry {
                // The waiter may have given up; nothing to do then.
                let _ = waiter.send(!no_responders);
            }
        }
    }
}

fn publish_error(err: async_nats::PublishError) -> TransportError {
    use async_nats::client::PublishErrorKind;
    match err.kind() {
        PublishErrorKind::MaxPayloadExceeded => {
            TransportError::PayloadTooLarge { len: 0, limit: 0 }
        }
        PublishErrorKind::InvalidSubject => TransportError::Refused {
            reason: err.to_string(),
        },
        PublishErrorKind::Send => TransportError::Closed,
    }
}

#[async_trait]
impl Transport for NatsTransport {
    async fn publish(&self, subject: String, payload: Bytes) -> Result<(), TransportError> {
        self.check_size(payload.len())?;
        self.client
            .publish(subject, payload)
            .await
            .map_err(publish_error)
    }

    async fn publish_all(&self, subject: &str, payloads: Vec<Bytes>) -> Result<(), PartialPublish> {
        // One subject for all of them: each message shares its bytes.
        let subject = async_nats::Subject::from(subject);
        for (sent, payload) in payloads.into_iter().enumerate() {
            let partial = |error| PartialPublish { sent, error };
            self.check_size(payload.len()).map_err(partial)?;
            self.client
                .publish(subject.clone(), payload)
                .await
                .map_err(|e| partial(publish_error(e)))?;
        }
        Ok(())
    }

    async fn publish_if_listened(
        &self,
        subject: String,
        payload: Bytes,
    ) -> Result<bool, TransportError> {
        self.check_size(payload.len())?;
        let n = self.next_check.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| TransportError::Closed)?
            .insert(n, (false, tx));
        let sent = async {
            self.client
                .publish_with_reply(subject, format!("{}.a.{n}", self.inbox), payload)
                .await?;
            self.client
                .publish(format!("{}.m.{n}", self.inbox), Bytes::new())
                .await
        }
        .await;
        let outcome = match sent {
            Err(err) => Err(publish_error(err)),
            Ok(()) => match tokio::time::timeout(LISTENER_CHECK_TIMEOUT, rx).await {
                Ok(Ok(delivered)) => Ok(delivered),
                Ok(Err(_)) => Err(TransportError::Closed),
                Err(_) => Err(TransportError::TimedOut {
                    millis: crate::clock::millis(LISTENER_CHECK_TIMEOUT),
                }),
            },
        };
        if let Ok(mut map) = self.pending.lock() {
            map.remove(&n);
        }
        outcome
    }

    async fn subscribe(
        &self,
        subject: String,
        queue_group: Option<String>,
    ) -> Result<Subscription, TransportError> {
        let sub = match queue_group {
            None => self.client.subscribe(subject).await,
            Some(group) => self.client.queue_subscribe(subject, group).await,
        }
        .map_err(|e| TransportError::Refused {
            reason: e.to_string(),
        })?;
        Ok(Subscription::new(sub.map(|m| InboundMessage {
            subject: m.subject.to_string(),
            reply: m.reply.map(|r| r.to_string()),
            payload: m.payload,
        })))
    }

    async fn flush(&self) -> Result<(), TransportError> {
        self.client
            .flush()
            .await
            .map_err(|_| TransportError::Disconnected)
    }

    async fn request(
        &self,
        subject: String,
        payload: Bytes,
        patience: Duration,
    ) -> Result<Bytes, TransportError> {
        NatsTransport::request(self, subject, payload, patience)
            .await?
            .ok_or_else(|| TransportError::Refused {
                reason: "nobody answers on that subject".to_owned(),
            })
    }

    async fn work_queue(
        &self,
        stream: &super::work_queue::WorkQueueSpec,
        consumer: &super::work_queue::ConsumerSpec,
    ) -> Result<Arc<dyn super::work_queue::WorkQueue>, TransportError> {
        jetstream::open(&self.client, stream, consumer).await
    }

    fn connection(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }
}
