//! The message bus, behind the [`Transport`] seam: core publish/subscribe with subjects, as
//! NATS provides it.
//!
//! The worker needs five things of a bus: publish (one message, or several in one call),
//! publish only if somebody listens (the existing controller subscribes to a response subject
//! *after* sending the request, so the first message of a stream must wait for it), subscribe
//! (optionally in a queue group), flush, and news of the connection. [`nats::NatsTransport`] is the production implementation; the
//! `sim` crate has a simulated broker. Payload bytes are opaque here: encoding is `protocol`'s.

pub mod embedded;
pub mod nats;
pub mod work_queue;

use std::fmt;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use futures::StreamExt;
use tokio::sync::watch;

/// One message received on a subscription.
#[derive(Clone, Debug, PartialEq)]
pub struct InboundMessage {
    /// The subject it was published on.
    pub subject: String,
    /// Where the sender wants replies, if anywhere.
    pub reply: Option<String>,
    /// The bytes.
    pub payload: Bytes,
}

/// A live subscription. Dropping it unsubscribes.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = InboundMessage> + Send>>,
}

impl Subscription {
    /// Wraps a stream of messages; the subscription ends when the stream does.
    pub fn new(stream: impl Stream<Item = InboundMessage> + Send + 'static) -> Self {
        Subscription {
            inner: Box::pin(stream),
        }
    }

    /// The next message, or `None` once the subscription has ended.
    ///
    /// Cancellation-safe: a message is either returned or left in the subscription.
    pub async fn next(&mut self) -> Option<InboundMessage> {
        self.inner.next().await
    }
}

impl Stream for Subscription {
    type Item = InboundMessage;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<InboundMessage>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Subscription")
    }
}

/// The connection as the worker sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionState {
    /// Whether the link to the server is up.
    pub connected: bool,
    /// Times the link came back after being lost (0 until the first loss).
    pub reconnects: u64,
}

/// Why a transport operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The payload exceeds the server's limit; it was not sent.
    #[error("payload is {len} bytes, limit {limit}")]
    PayloadTooLarge {
        /// The payload's size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The link is down and the operation could not be queued.
    #[error("not connected to the message server")]
    Disconnected,
    /// The server did not answer in time.
    #[error("the message server did not answer within {millis} ms")]
    TimedOut {
        /// How long was waited.
        millis: u64,
    },
    /// The server refused the operation (permissions, invalid subject).
    #[error("the message server refused: {reason}")]
    Refused {
        /// The server's or client's words.
        reason: String,
    },
    /// The transport has been closed.
    #[error("the transport is closed")]
    Closed,
}

/// Why [`Transport::publish_all`] stopped: the error, and how many of the messages had been
/// handed to the connection before it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{error} ({sent} messages sent before it)")]
pub struct PartialPublish {
    /// Messages handed over before the error, from the first on.
    pub sent: usize,
    /// What stopped the rest.
    pub error: TransportError,
}

/// A message bus with subjects.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Publishes `payload` on `subject`. Returns once the message is handed to the connection
    /// (not once the server has it); order per transport is preserved.
    async fn publish(&self, subject: String, payload: Bytes) -> Result<(), TransportError>;

    /// Publishes each of `payloads` on `subject`, in order, as [`Transport::publish`] would one
    /// by one, in one call: a transport that can hands them over together. Stops at the first
    /// error; the messages before it were handed over.
    async fn publish_all(&self, subject: &str, payloads: Vec<Bytes>) -> Result<(), PartialPublish> {
        for (sent, payload) in payloads.into_iter().enumerate() {
            self.publish(subject.to_owned(), payload)
                .await
                .map_err(|error| PartialPublish { sent, error })?;
        }
        Ok(())
    }

    /// Publishes `payload` on `subject` only if at least one subscriber listens there.
    /// Returns `Ok(true)` when the message was delivered, `Ok(false)` when nobody listened and
    /// the server dropped it. Costs one server round trip.
    async fn publish_if_listened(
        &self,
        subject: String,
        payload: Bytes,
    ) -> Result<bool, TransportError>;

    /// Subscribes to `subject` (wildcards allowed), in `queue_group` if given: a queue group
    /// delivers each message to one member only.
    async fn subscribe(
        &self,
        subject: String,
        queue_group: Option<String>,
    ) -> Result<Subscription, TransportError>;

    /// Waits until everything published so far has been written to the server.
    async fn flush(&self) -> Result<(), TransportError>;

    /// Publishes `payload` on `subject` as a request and returns the first reply, waiting at
    /// most `patience`. A transport without request/reply refuses.
    async fn request(
        &self,
        subject: String,
        payload: Bytes,
        patience: std::time::Duration,
    ) -> Result<Bytes, TransportError> {
        let _ = (subject, payload, patience);
        Err(TransportError::Refused {
            reason: "this transport has no request/reply".to_owned(),
        })
    }

    /// Creates the work-queue stream `stream` and its consumer `consumer` if they do not exist
    /// yet (both idempotently; neither is ever deleted here), and returns the consumer, ready to
    /// pull. A transport without work queues refuses.
    async fn work_queue(
        &self,
        stream: &work_queue::WorkQueueSpec,
        consumer: &work_queue::ConsumerSpec,
    ) -> Result<std::sync::Arc<dyn work_queue::WorkQueue>, TransportError> {
        let _ = (stream, consumer);
        Err(TransportError::Refused {
            reason: "this transport has no work queues".to_owned(),
        })
    }

    /// The connection state, updated as the link goes down and comes back.
    fn connection(&self) -> watch::Receiver<ConnectionState>;
}
