//! A work queue behind the [`Transport`](super::Transport) seam: messages kept by the server
//! until a consumer takes them, pulled a few at a time, each settled by its taker — the shape
//! of a JetStream work-queue stream with pull consumers.
//!
//! A worker asks for as many messages as it has free run slots ([`WorkQueue::pull`]); what the
//! server hands over arrives on a [`WorkBatch`] as it comes. A message taken and not settled
//! goes to a consumer again after the queue's ack wait, so a worker that dies loses only what it
//! had settled (started); [`Settle::release`] hands one back at once.

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

use super::{InboundMessage, TransportError};

/// The stream the work queue keeps its messages in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkQueueSpec {
    /// The stream's name.
    pub stream: String,
    /// The subjects it captures.
    pub subjects: Vec<String>,
    /// How long a message is kept at most.
    pub max_age: Duration,
    /// How many messages it holds at most; a publish past it is refused.
    pub max_messages: i64,
    /// How many bytes it holds at most; a publish past it is refused.
    pub max_bytes: i64,
    /// Copies kept by a cluster (1 on a single server).
    pub replicas: usize,
}

/// One consumer of a work queue: the messages of one filter subject, shared by everyone who
/// pulls under the same name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerSpec {
    /// The durable consumer's name.
    pub name: String,
    /// The subject it takes.
    pub filter_subject: String,
    /// How long a taken message may stay unsettled before it is delivered again.
    pub ack_wait: Duration,
    /// How many times a message is delivered at most.
    pub max_deliver: i64,
}

/// A message taken from a work queue.
pub struct WorkItem {
    /// The message as it was published (its reply subject is the queue's, not the sender's).
    pub message: InboundMessage,
    /// When the server stored it, in milliseconds since the Unix epoch, if it said.
    pub published_unix_ms: Option<u64>,
    /// How many times it has been delivered, this time included.
    pub deliveries: u64,
    /// How the taker tells the queue what became of it.
    pub settle: Box<dyn Settle>,
}

impl std::fmt::Debug for WorkItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkItem")
            .field("subject", &self.message.subject)
            .field("published_unix_ms", &self.published_unix_ms)
            .field("deliveries", &self.deliveries)
            .finish_non_exhaustive()
    }
}

/// What becomes of a taken message.
#[async_trait]
pub trait Settle: Send + Sync + std::fmt::Debug {
    /// Done with it: the queue removes it. Waits for the server to confirm, so a message
    /// acknowledged here is not delivered again.
    async fn ack(&self) -> Result<(), TransportError>;

    /// Not taken after all: delivered again at once, to any consumer.
    async fn release(&self) -> Result<(), TransportError>;
}

/// Messages of one pull, as the server hands them over; ends when the pull's count has
/// arrived or its wait has passed, or with the error that broke it.
pub type WorkBatch = Pin<Box<dyn Stream<Item = Result<WorkItem, TransportError>> + Send>>;

/// A consumer of a work queue, ready to pull.
#[async_trait]
pub trait WorkQueue: Send + Sync {
    /// Asks for at most `max` messages, waiting at most `wait` for them.
    async fn pull(&self, max: usize, wait: Duration) -> Result<WorkBatch, TransportError>;
}
