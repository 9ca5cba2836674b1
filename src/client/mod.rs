//! The requesting side of the inference protocol: send a request, read its response stream.
//!
//! A request goes to one worker (`worker.{workerId}.inference`) or to any worker serving a
//! model (`inference.{model-token}`); its answer is a stream on `response.{requestId}`: tokens
//! with indices 0, 1, 2, …, then exactly one terminal message, `done` or `error`, and nothing
//! after it. [`Client`] subscribes to the response subject *before* it publishes the request,
//! both on one [`Transport`], whose server handles a connection's operations in order, so no
//! message of the stream can be missed. [`ResponseStream`] hands out each message as it
//! arrives, with the time it arrived, and holds the stream to its rules as it goes.
//!
//! The rules themselves are [`StreamCheck`]: pure, fed one decoded message at a time, so a
//! checker that sees the messages another way (the simulator's invariants on a trace) applies
//! the same rules. This module owns the client's view of a stream; the wire types are
//! `protocol`'s and the bus is `transport`'s.

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::clock::{Clock, millis};
use crate::config::ModelSubjects;
use crate::limits::STREAM_MESSAGES_MAX;
use crate::protocol::subject::{self, TokenError};
use crate::protocol::{InferenceRequest, StreamMessage, encode};
use crate::transport::{Subscription, Transport, TransportError};

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One worker, on `worker.{workerId}.inference`.
    Worker(String),
    /// Whichever worker of the model's queue group takes it, on `inference.{model-token}`.
    Model(String),
}

impl Target {
    /// The subject a request for this target is published on.
    pub fn subject(&self) -> Result<String, ClientError> {
        match self {
            Target::Worker(id) => {
                check_id("worker id", id)?;
                Ok(subject::inference(id))
            }
            Target::Model(model) => Ok(subject::model_inference(model)),
        }
    }
}

/// How a stream ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `done`.
    Done {
        /// Tokens the worker says it sent.
        total_tokens: u64,
        /// The worker's milliseconds from receipt to the end.
        latency_ms: u64,
    },
    /// `error`.
    Failed {
        /// The machine-readable code.
        code: String,
        /// The human-readable reason.
        error: String,
    },
}

impl Outcome {
    /// The outcome a terminal message stands for; `None` for a token.
    pub fn of(message: &StreamMessage) -> Option<Outcome> {
        match message {
            StreamMessage::Token { .. } => None,
            StreamMessage::Done {
                total_tokens,
                latency_ms,
                ..
            } => Some(Outcome::Done {
                total_tokens: *total_tokens,
                latency_ms: *latency_ms,
            }),
            StreamMessage::Error { code, error, .. } => Some(Outcome::Failed {
                code: code.clone(),
                error: error.clone(),
            }),
        }
    }

    /// Whether the request succeeded.
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Done { .. })
    }
}

/// A rule of the response stream that a message broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamViolation {
    /// The message names another request.
    #[error("a message of request {found:?}")]
    WrongRequest {
        /// The request id it carries.
        found: String,
    },
    /// A token's index is not the next one.
    #[error("token {found}, expected {expected}")]
    TokenIndex {
        /// The index due.
        expected: u64,
        /// The index it carries.
        found: u64,
    },
    /// `done` counts another number of tokens than came before it.
    #[error("done counts {total_tokens} tokens, {received} came before it")]
    TokenCount {
        /// The count in `done`.
        total_tokens: u64,
        /// Tokens that came before it.
        received: u64,
    },
    /// A message came after the terminal one.
    #[error("{} after the terminal message", if *terminal { "a second terminal" } else { "a token" })]
    AfterTerminal {
        /// Whether the late message is itself a terminal.
        terminal: bool,
    },
}

/// The rules of one response stream, checked message by message: every message names the
/// request; token indices run 0, 1, 2, …; `done`'s `totalTokens` is the number of tokens
/// before it; exactly one terminal (`done` or `error`) ends the stream, and nothing follows
/// it. Pure: no I/O, no time.
#[derive(Clone, Debug)]
pub struct StreamCheck {
    request_id: String,
    tokens: u64,
    next_index: u64,
    ended: bool,
}

impl StreamCheck {
    /// The check of a stream for `request_id` that has seen nothing yet.
    pub fn new(request_id: impl Into<String>) -> StreamCheck {
        StreamCheck {
            request_id: request_id.into(),
            tokens: 0,
            next_index: 0,
            ended: false,
        }
    }

    /// Checks the next message of the stream. After a violation the check goes on from that
    /// message (a token resets the index due to the one after it; a terminal ends the stream),
    /// so a checker that keeps going reports each break once.
    pub fn push(&mut self, message: &StreamMessage) -> Result<(), StreamViolation> {
        if self.ended {
            return Err(StreamViolation::AfterTerminal {
                terminal: message.is_terminal(),
            });
        }
        let named = match message {
            StreamMessage::Token { request_id, .. } | StreamMessage::Done { request_id, .. } => {
                Some(request_id.as_str())
            }
            // An error may lack the id when the request could not be read.
            StreamMessage::Error { request_id, .. } => request_id.as_deref(),
        };
        let mut broken = named
            .filter(|found| *found != self.request_id)
            .map(|found| StreamViolation::WrongRequest {
                found: found.to_owned(),
            });
        match message {
            StreamMessage::Token { index, .. } => {
                if *index != self.next_index {
                    broken.get_or_insert(StreamViolation::TokenIndex {
                        expected: self.next_index,
                        found: *index,
                    });
                }
                self.next_index = index.saturating_add(1);
                self.tokens += 1;
            }
            StreamMessage::Done { total_tokens, .. } => {
                self.ended = true;
                if *total_tokens != self.tokens {
                    broken.get_or_insert(StreamViolation::TokenCount {
                        total_tokens: *total_tokens,
                        received: self.tokens,
                    });
                }
            }
            StreamMessage::Error { .. } => self.ended = true,
        }
        broken.map_or(Ok(()), Err)
    }

    /// Whether the terminal message has been seen.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Tokens seen so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

/// Why a request could not be sent or its stream not read to its end.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// An id cannot stand in a subject.
    #[error("{what} {id:?} cannot be a subject token: it {reason}")]
    BadId {
        /// Which id.
        what: &'static str,
        /// The id.
        id: String,
        /// What is wrong with it.
        reason: TokenError,
    },
    /// The request could not be encoded.
    #[error("cannot encode the request: {reason}")]
    Encode {
        /// The encoder's words.
        reason: String,
    },
    /// The response subject could not be subscribed to.
    #[error("cannot subscribe to {subject}: {cause}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// What the transport said.
        cause: TransportError,
    },
    /// The work-queue stream did not store the request.
    #[error("the work queue did not take the request on {subject}: {reason}")]
    NotQueued {
        /// The subject.
        subject: String,
        /// The stream's words, or why there was none.
        reason: String,
    },
    /// The request could not be published.
    #[error("cannot publish on {subject}: {cause}")]
    Publish {
        /// The subject.
        subject: String,
        /// What the transport said.
        cause: TransportError,
    },
    /// The next message did not come in time.
    #[error("no message on response.{request_id} within {millis} ms ({received} received)")]
    TimedOut {
        /// The request.
        request_id: String,
        /// How long was waited.
        millis: u64,
        /// Messages of the stream received before.
        received: usize,
    },
    /// The subscription ended (the transport closed) before the stream did.
    #[error("the subscription to response.{request_id} ended before the stream did")]
    SubscriptionEnded {
        /// The request.
        request_id: String,
    },
    /// A message on the response subject is not a stream message.
    #[error("response.{request_id} carried a message that is not a stream message: {reason}")]
    Undecodable {
        /// The request.
        request_id: String,
        /// The decoder's words.
        reason: String,
    },
    /// A message broke a rule of the stream.
    #[error("response.{request_id} broke the stream's rules: {violation}")]
    Broken {
        /// The request.
        request_id: String,
        /// The rule and how it was broken.
        violation: StreamViolation,
    },
    /// A quiet window was asked of a stream that has not ended.
    #[error("response.{request_id} has not ended, so it cannot be quiet after its end")]
    NotEnded {
        /// The request.
        request_id: String,
    },
    /// The stream ran past the most messages a stream can have.
    #[error("response.{request_id} ran past {limit} messages without ending")]
    TooLong {
        /// The request.
        request_id: String,
        /// The bound.
        limit: usize,
    },
}

fn check_id(what: &'static str, id: &str) -> Result<(), ClientError> {
    subject::check_token(id).map_err(|reason| ClientError::BadId {
        what,
        id: id.to_owned(),
        reason,
    })
}

/// Sends requests and opens their response streams over one transport.
#[derive(Clone)]
pub struct Client {
    transport: Arc<dyn Transport>,
    /// Stamps every arrival and the moment a request is sent.
    clock: Arc<dyn Clock>,
    /// Whether requests to a model go into a work-queue stream (published with the stream's
    /// acknowledgement) rather than to a queue group.
    work_queue: bool,
}

impl Client {
    /// A client over `transport`, reading time from `clock`, sending model-addressed requests
    /// to the model queue groups.
    pub fn new(transport: Arc<dyn Transport>, clock: Arc<dyn Clock>) -> Client {
        Client {
            transport,
            clock,
            work_queue: false,
        }
    }

    /// The same client, sending model-addressed requests as the workers take them: into the
    /// work-queue stream (`mode` [`ModelSubjects::JetStream`]) or to the queue groups.
    pub fn with_model_subjects(mut self, mode: &ModelSubjects) -> Client {
        self.work_queue = matches!(mode, ModelSubjects::JetStream(_));
        self
    }

    /// Sends `request` to `target`: subscribes to its response subject first, then publishes.
    pub async fn send(
        &self,
        target: &Target,
        request: &InferenceRequest,
    ) -> Result<ResponseStream, ClientError> {
        let payload = encode(request).map_err(|e| ClientError::Encode {
            reason: e.to_string(),
        })?;
        self.send_payload(target, &request.request_id, Bytes::from(payload))
            .await
    }

    /// Sends `payload`, the bytes of a request for `request_id` (well-formed or not, as a
    /// test may want), to `target`: subscribes to the response subject first, then publishes.
    pub async fn send_payload(
        &self,
        target: &Target,
        request_id: &str,
        payload: Bytes,
    ) -> Result<ResponseStream, ClientError> {
        // A target that cannot be a subject is refused before anything is sent.
        target.subject()?;
        let mut stream = self.subscribe(request_id).await?;
        stream.sent_at = self.clock.now();
        self.publish(target, payload).await?;
        Ok(stream)
    }

    /// Opens the response stream of `request_id` without sending anything (the request goes
    /// out with [`Client::publish`], or has gone out already).
    pub async fn subscribe(&self, request_id: &str) -> Result<ResponseStream, ClientError> {
        check_id("request id", request_id)?;
        let subject = subject::response(request_id);
        let subscription = self
            .transport
            .subscribe(subject.clone(), None)
            .await
            .map_err(|cause| ClientError::Subscribe { subject, cause })?;
        Ok(ResponseStream {
            request_id: request_id.to_owned(),
            subscription,
            check: StreamCheck::new(request_id),
            clock: self.clock.clone(),
            sent_at: self.clock.now(),
            received: 0,
            outcome: None,
        })
    }

    /// Publishes `payload` on `target`'s subject, with no response stream. Into a work queue,
    /// it returns once the stream has stored the request, and refuses when the stream does
    /// not (it is full, or no stream takes the subject).
    pub async fn publish(&self, target: &Target, payload: Bytes) -> Result<(), ClientError> {
        let subject = target.subject()?;
        if self.work_queue && matches!(target, Target::Model(_)) {
            return self.enqueue(subject, payload).await;
        }
        self.transport
            .publish(subject.clone(), payload)
            .await
            .map_err(|cause| ClientError::Publish { subject, cause })
    }

    /// Publishes into a work-queue stream and reads the stream's acknowledgement.
    async fn enqueue(&self, subject: String, payload: Bytes) -> Result<(), ClientError> {
        let answer = self
            .transport
            .request(subject.clone(), payload, WORK_QUEUE_PUBLISH_WAIT)
            .await
            .map_err(|cause| match cause {
                TransportError::Refused { .. } => ClientError::NotQueued {
                    subject: subject.clone(),
                    reason: format!(
                        "no stream takes it ({cause}); is modelSubjects.mode jetstream on the \
                         workers, and has one of them started?"
                    ),
                },
                cause => ClientError::Publish {
                    subject: subject.clone(),
                    cause,
                },
            })?;
        match serde_json::from_slice::<PublishAck>(&answer) {
            Ok(PublishAck {
                error: Some(error), ..
            }) => Err(ClientError::NotQueued {
                subject,
                reason: format!("{} (code {})", error.description, error.err_code),
            }),
            Ok(PublishAck {
                stream: Some(_), ..
            }) => Ok(()),
            _ => Err(ClientError::NotQueued {
                subject,
                reason: format!(
                    "unexpected answer {:?}",
                    String::from_utf8_lossy(&answer[..answer.len().min(200)])
                ),
            }),
        }
    }
}

/// How long a publish into a work queue waits for the stream's acknowledgement.
const WORK_QUEUE_PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// A stream's answer to a publish: where it stored it, or why not.
#[derive(serde::Deserialize)]
struct PublishAck {
    stream: Option<String>,
    error: Option<PublishAckError>,
}

#[derive(serde::Deserialize)]
struct PublishAckError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// One message of a stream, as it arrived.
#[derive(Clone, Debug, PartialEq)]
pub struct Arrival {
    /// The message, decoded.
    pub message: StreamMessage,
    /// Its bytes, as they came.
    pub payload: Bytes,
    /// When it was read off the subscription.
    pub at: Instant,
}

/// The response stream of one request, read message by message and held to the stream's
/// rules ([`StreamCheck`]). Dropping it unsubscribes.
pub struct ResponseStream {
    request_id: String,
    /// The response subject's subscription; dropped with the stream.
    subscription: Subscription,
    check: StreamCheck,
    clock: Arc<dyn Clock>,
    sent_at: Instant,
    /// Messages read so far, bounded by [`STREAM_MESSAGES_MAX`].
    received: usize,
    outcome: Option<Outcome>,
}

impl std::fmt::Debug for ResponseStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseStream")
            .field("request_id", &self.request_id)
            .field("received", &self.received)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl ResponseStream {
    /// The request.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// When the request was handed to the transport (for a stream opened with
    /// [`Client::subscribe`], when it was subscribed).
    pub fn sent_at(&self) -> Instant {
        self.sent_at
    }

    /// How the stream ended, once it has.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// Tokens received so far.
    pub fn tokens(&self) -> u64 {
        self.check.tokens()
    }

    /// The next message, waiting at most `patience` for it. A message that breaks the
    /// stream's rules (one after the terminal included) is an error.
    pub async fn next(&mut self, patience: Duration) -> Result<Arrival, ClientError> {
        if self.received >= STREAM_MESSAGES_MAX && !self.check.ended() {
            return Err(ClientError::TooLong {
                request_id: self.request_id.clone(),
                limit: STREAM_MESSAGES_MAX,
            });
        }
        let inbound = match tokio::time::timeout(patience, self.subscription.next()).await {
            Err(_) => {
                return Err(ClientError::TimedOut {
                    request_id: self.request_id.clone(),
                    millis: millis(patience),
                    received: self.received,
                });
            }
            Ok(None) => {
                return Err(ClientError::SubscriptionEnded {
                    request_id: self.request_id.clone(),
                });
            }
            Ok(Some(inbound)) => inbound,
        };
        let at = self.clock.now();
        self.received += 1;
        let message: StreamMessage =
            serde_json::from_slice(&inbound.payload).map_err(|e| ClientError::Undecodable {
                request_id: self.request_id.clone(),
                reason: e.to_string(),
            })?;
        self.check
            .push(&message)
            .map_err(|violation| ClientError::Broken {
                request_id: self.request_id.clone(),
                violation,
            })?;
        if let Some(outcome) = Outcome::of(&message) {
            self.outcome = Some(outcome);
        }
        Ok(Arrival {
            message,
            payload: inbound.payload,
            at,
        })
    }

    /// Reads the stream up to its terminal message, within `timeout` in all, then confirms
    /// that nothing follows it for `quiet` ([`ResponseStream::confirm_quiet`]); returns the
    /// messages read by this call (those already handed out by [`ResponseStream::next`] are
    /// not repeated). A `quiet` of zero checks only what has already arrived.
    pub async fn collect(
        &mut self,
        timeout: Duration,
        quiet: Duration,
    ) -> Result<Vec<StreamMessage>, ClientError> {
        let deadline = self.clock.now() + timeout;
        let mut out = Vec::new();
        while !self.check.ended() {
            let left = deadline.saturating_duration_since(self.clock.now());
            match self.next(left).await {
                Ok(arrival) => out.push(arrival.message),
                Err(ClientError::TimedOut {
                    request_id,
                    received,
                    ..
                }) => {
                    return Err(ClientError::TimedOut {
                        request_id,
                        millis: millis(timeout),
                        received,
                    });
                }
                Err(other) => return Err(other),
            }
        }
        self.confirm_quiet(quiet).await?;
        Ok(out)
    }

    /// For a stream that has ended: waits `window` and fails if any message arrives on the
    /// response subject meanwhile (a second terminal or a token after the end, as
    /// [`StreamViolation::AfterTerminal`]); a message already waiting counts, one that comes
    /// after the window does not.
    pub async fn confirm_quiet(&mut self, window: Duration) -> Result<(), ClientError> {
        if !self.check.ended() {
            return Err(ClientError::NotEnded {
                request_id: self.request_id.clone(),
            });
        }
        match self.next(window).await {
            Err(ClientError::TimedOut { .. }) => Ok(()),
            Err(other) => Err(other),
            Ok(arrival) => unreachable!(
                "the check refuses every message after the terminal, got {:?}",
                arrival.message
            ),
        }
    }
}
