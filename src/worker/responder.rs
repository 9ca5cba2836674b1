//! Publishes one response stream on `response.{requestId}`, in order, so that it ends with
//! exactly one terminal message a client can trust.
//!
//! Three things stand between a message handed to the connection and the client:
//!
//! - **A late subscriber.** The existing controller publishes a request and subscribes to its
//!   response subject only afterwards, so a fast worker's first messages would reach nobody.
//!   The first message of every stream (a token, or a terminal) therefore goes out no earlier
//!   than `lateSubscriberMinDelayMs` after the request's receipt, and then only once somebody
//!   listens: checked with [`Transport::publish_if_listened`], retried with a [`Backoff`] up to
//!   `lateSubscriberWaitMs`. The check asks whether *anybody* listens, so a tap on `response.>`
//!   passes it for every stream; the fixed delay is what protects the client then.
//! - **A lost link.** Core NATS keeps nothing: what the client library had not yet written
//!   when the link died is gone, and so is what reaches a restarted server before the client
//!   has subscribed again; nobody can tell which messages those were. A stream therefore goes
//!   on only while the link is the one its first message was delivered on
//!   ([`Transport::connection`]); once that link is lost the stream is *broken*: no token
//!   follows, and it ends with `STREAM_INTERRUPTED` once the link is back. Messages due while
//!   the link is down wait for it, until the request's deadline, instead of piling up in the
//!   client library (async-nats queues them without an error until its command channel is
//!   full, then blocks; a flush waits for the link). Tokens that come together are handed to
//!   the connection in one call, the link checked before it: a loss during the call breaks the
//!   stream at the next one, and its end is the same `STREAM_INTERRUPTED`.
//! - **An unconfirmed end.** The terminal goes through the listener check too: the check's
//!   answer comes only after the server has handled everything the connection sent before it,
//!   so a check that succeeds confirms the whole stream, even over a link that died silently.
//!   A check that fails because the link went down leaves the terminal's fate unknown: it is
//!   sent again once the link is back (a `done` as `STREAM_INTERRUPTED` then, since the tokens
//!   before it may be lost too), at most [`TERMINAL_ATTEMPTS_MAX`] times. A terminal that did
//!   arrive just before the link died, with its answer lost, thus arrives twice; clients drop
//!   whatever follows a terminal, while a missing one would hang them.
//!
//! After a link loss, clients need time to reconnect and subscribe again: a message then waits
//! for a listener at least [`LISTENER_REJOIN_WAIT`], within the deadline. A listener wait of
//! zero turns the check off: messages then go out as plain publishes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tracing::{debug, warn};

use crate::backoff::{self, Backoff};
use crate::clock::{Clock, millis};
use crate::limits::{
    LISTENER_CHECK_DELAY_MAX, LISTENER_CHECK_DELAY_MIN, LISTENER_REJOIN_WAIT,
    TERMINAL_ATTEMPTS_MAX, TERMINAL_SEND_TIMEOUT,
};
use crate::mutation::{Mutation, Mutations};
use crate::protocol::{self, TokenMessage, subject};
use crate::transport::{ConnectionState, Transport, TransportError};

/// When a stream's messages may go out, and how long they may wait.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    /// The first message goes out no earlier (receipt plus `lateSubscriberMinDelayMs`).
    pub(crate) not_before: Instant,
    /// Longest wait for a listener before a message that needs one; zero turns the check off.
    pub(crate) listener_wait: Duration,
    /// The request's deadline: no wait for the link lasts beyond it.
    pub(crate) deadline: Instant,
}

/// Where the stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Nothing sent yet.
    Fresh,
    /// The first message was delivered while the link had come back `link` times; later
    /// messages follow it in order for as long as that link lasts.
    Open { link: u64 },
    /// A message may have been lost: only a checked terminal may follow.
    Broken,
    /// The terminal is out.
    Ended,
}

/// Why a message did not go out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Failure {
    /// The link to the message server was down and did not come back by the deadline.
    #[error("the link to the message server was not back by the request's deadline")]
    LinkDown,
    /// The link was seen lost after the stream's first message.
    #[error("the link to the message server was lost during the stream")]
    LinkLost,
    /// The transport failed the publish.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Every attempt at the terminal was cut by a link loss.
    #[error("the link to the message server was lost during each of {TERMINAL_ATTEMPTS_MAX} tries")]
    Attempts,
}

/// A token that was not sent: the stream cannot continue.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{cause}")]
pub(crate) struct Broken {
    /// Whether it was the stream's first message.
    pub(crate) first: bool,
    /// What stopped it.
    pub(crate) cause: Failure,
    /// Tokens of the same call that went out before it.
    pub(crate) sent: usize,
}

/// Which form of a terminal went out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// The terminal as given.
    AsIs,
    /// Its replacement, after a try that may have been lost with the link.
    Retry,
}

/// The publisher of one response stream.
pub(crate) struct Responder {
    transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    /// The link's state, followed to tell a broken stream and to wait for the link.
    connection: watch::Receiver<ConnectionState>,
    subject: String,
    window: Window,
    /// Jitters the listener checks' backoff, per request.
    seed: u64,
    mutations: Mutations,
    state: State,
    /// Whether this stream saw the link down: clients may be reconnecting.
    saw_loss: bool,
}

impl Responder {
    /// A responder for `request_id`, whose id has passed `subject::check_token`.
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        clock: Arc<dyn Clock>,
        request_id: &str,
        window: Window,
        mutations: Mutations,
    ) -> Responder {
        Responder {
            connection: transport.connection(),
            transport,
            clock,
            subject: subject::response(request_id),
            window,
            seed: backoff::seed(request_id),
            mutations,
            state: State::Fresh,
            saw_loss: false,
        }
    }

    /// Whether the stream so far may end with `done`: nothing sent yet, or every message sent
    /// on a link that still lasts.
    pub(crate) fn is_intact(&self) -> bool {
        match self.state {
            State::Fresh => true,
            State::Open { link } => self.link_is(link),
            State::Broken | State::Ended => false,
        }
    }

    /// Publishes the next tokens, in order: the stream's first message alone, once the delay,
    /// the link and a listener allow (see the module), and the others in one hand-off to the
    /// transport while the link is the stream's. An error means the stream cannot continue:
    /// only its terminal may follow; [`Broken::sent`] says how many of `messages` went out
    /// before it.
    pub(crate) async fn tokens(&mut self, messages: &[TokenMessage<'_>]) -> Result<(), Broken> {
        let fresh = self.state == State::Fresh;
        let broken = |cause: Failure, sent: usize| Broken {
            first: fresh && sent == 0,
            cause,
            sent,
        };
        let mut payloads = encode_all(messages).map_err(|cause| broken(cause, 0))?;
        let mut sent = 0;
        if fresh && !payloads.is_empty() {
            let first = payloads.remove(0);
            match self.deliver(&first).await {
                Ok(link) => self.state = State::Open { link },
                Err(cause) => {
                    self.state = State::Broken;
                    return Err(broken(cause, 0));
                }
            }
            sent = 1;
        }
        if payloads.is_empty() {
            return Ok(());
        }
        match self.state {
            State::Open { link } if self.link_is(link) => self
                .transport
                .publish_all(&self.subject, payloads)
                .await
                .map_err(|partial| {
                    self.state = State::Broken;
                    broken(Failure::Transport(partial.error), sent + partial.sent)
                }),
            State::Open { .. } => {
                self.saw_loss = true;
                self.state = State::Broken;
                Err(broken(Failure::LinkLost, sent))
            }
            State::Fresh | State::Broken | State::Ended => Err(broken(Failure::LinkLost, sent)),
        }
    }

    /// Publishes the terminal, checked, once the link is up: `message`, or `retry` after a try
    /// that may have been lost with the link (see the module). Returns which went out.
    ///
    /// Bounded: the link is waited for until the deadline, a listener as [`Window`] says, and
    /// all of it at most [`TERMINAL_SEND_TIMEOUT`] past the later of the two.
    pub(crate) async fn terminal<A: Serialize, B: Serialize>(
        &mut self,
        message: &A,
        retry: &B,
    ) -> Result<Sent, Failure> {
        let now = self.clock.now();
        let bound =
            self.window.deadline.max(now + self.window.listener_wait) + TERMINAL_SEND_TIMEOUT;
        match timeout_at(bound, self.try_terminal(message, retry)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Failure::Transport(TransportError::TimedOut {
                millis: millis(bound.saturating_duration_since(now)),
            })),
        }
    }

    async fn try_terminal<A: Serialize, B: Serialize>(
        &mut self,
        message: &A,
        retry: &B,
    ) -> Result<Sent, Failure> {
        let mut payload = encode(message)?;
        let mut sent = Sent::AsIs;
        for _ in 0..TERMINAL_ATTEMPTS_MAX {
            match self.deliver(&payload).await {
                Ok(_) => {
                    self.state = State::Ended;
                    if self.window.listener_wait.is_zero() {
                        // Unchecked: at least push it to the server now.
                        match timeout(TERMINAL_SEND_TIMEOUT, self.transport.flush()).await {
                            Ok(Ok(())) => {}
                            Ok(Err(err)) => debug!(cause = %err, "flush after the terminal failed"),
                            Err(_) => debug!("flush after the terminal timed out"),
                        }
                    }
                    return Ok(sent);
                }
                Err(Failure::Transport(
                    err @ (TransportError::TimedOut { .. } | TransportError::Disconnected),
                )) => {
                    debug!(cause = %err, "the terminal may be lost with the link; sending it again");
                    self.state = State::Broken;
                    self.saw_loss = true;
                    payload = encode(retry)?;
                    sent = Sent::Retry;
                }
                Err(other) => return Err(other),
            }
        }
        Err(Failure::Attempts)
    }

    /// Publishes a message outside the stream's rules, for the planted bug that sends a token
    /// after the terminal.
    pub(crate) async fn publish_stray<T: Serialize>(&self, message: &T) {
        if let Ok(payload) = encode(message) {
            let _ = self.transport.publish(self.subject.clone(), payload).await;
        }
    }

    /// Sends one message that must be known delivered: the first of the stream (after the
    /// delay) or a terminal, once the link is up, through the listener check. Returns the link
    /// it went out on.
    async fn deliver(&mut self, payload: &Bytes) -> Result<u64, Failure> {
        let first = self.state == State::Fresh;
        if let State::Open { link } = self.state
            && !self.link_is(link)
        {
            self.saw_loss = true;
        }
        if first {
            sleep_until(self.window.not_before).await;
        }
        let follow_link = !(first && self.mutations.has(Mutation::AbandonOnFirstPublishTimeout));
        if follow_link {
            self.await_link().await?;
        }
        if self.window.listener_wait.is_zero() {
            let link = self.link();
            self.transport
                .publish(self.subject.clone(), payload.clone())
                .await?;
            return Ok(link);
        }
        let mut backoff = Backoff::new(
            LISTENER_CHECK_DELAY_MIN,
            LISTENER_CHECK_DELAY_MAX,
            self.seed,
        );
        let mut wait_end = self.listener_wait_end();
        loop {
            if follow_link && !self.connection.borrow().connected {
                self.await_link().await?;
                wait_end = wait_end.max(self.listener_wait_end());
            }
            let link = self.link();
            let subject = self.subject.clone();
            if self
                .transport
                .publish_if_listened(subject, payload.clone())
                .await?
            {
                return Ok(link);
            }
            let now = self.clock.now();
            if now >= wait_end {
                warn!(
                    subject = %self.subject,
                    wait_ms = millis(self.window.listener_wait),
                    "nobody listens on the response subject; publishing anyway"
                );
                self.transport
                    .publish(self.subject.clone(), payload.clone())
                    .await?;
                return Ok(link);
            }
            let delay = backoff.next_delay().unwrap_or(LISTENER_CHECK_DELAY_MAX);
            sleep(delay.min(wait_end - now)).await;
        }
    }

    /// When a listener check started now gives up: after the configured wait, or after the
    /// rejoin wait (within the deadline) once the link was seen lost.
    fn listener_wait_end(&self) -> Instant {
        let now = self.clock.now();
        let configured = now + self.window.listener_wait;
        if self.saw_loss {
            configured.max((now + LISTENER_REJOIN_WAIT).min(self.window.deadline))
        } else {
            configured
        }
    }

    /// Waits until the link is up, at most until the deadline.
    async fn await_link(&mut self) -> Result<(), Failure> {
        if self.connection.borrow().connected {
            return Ok(());
        }
        self.saw_loss = true;
        debug!(subject = %self.subject, "waiting for the link to the message server");
        let deadline = self.window.deadline;
        match timeout_at(deadline, self.connection.wait_for(|c| c.connected)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Failure::Transport(TransportError::Closed)),
            Err(_) => Err(Failure::LinkDown),
        }
    }

    /// Times the link has come back so far.
    fn link(&self) -> u64 {
        self.connection.borrow().reconnects
    }

    /// Whether the link is up and the same as when it had come back `link` times.
    fn link_is(&self, link: u64) -> bool {
        let state = *self.connection.borrow();
        state.connected && state.reconnects == link
    }
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("subject", &self.subject)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

fn encode<T: Serialize>(message: &T) -> Result<Bytes, Failure> {
    protocol::encode(message)
        .map(Bytes::from)
        .map_err(encoding_failure)
}

/// A token message's usual size, encoded: room for most of them at once.
const TOKEN_MESSAGE_BYTES: usize = 128;

/// Encodes `messages` into one buffer, each message's payload a slice of it: one allocation
/// for all of them, and each payload freed with the last of them.
fn encode_all(messages: &[TokenMessage<'_>]) -> Result<Vec<Bytes>, Failure> {
    let mut buffer = Vec::with_capacity(messages.len() * TOKEN_MESSAGE_BYTES);
    let mut ends = Vec::with_capacity(messages.len());
    for message in messages {
        protocol::encode_into(&mut buffer, message).map_err(encoding_failure)?;
        ends.push(buffer.len());
    }
    let buffer = Bytes::from(buffer);
    let mut start = 0;
    Ok(ends
        .into_iter()
        .map(|end| {
            let payload = buffer.slice(start..end);
            start = end;
            payload
        })
        .collect())
}

fn encoding_failure(e: serde_json::Error) -> Failure {
    Failure::Transport(TransportError::Refused {
        reason: format!("cannot encode a response: {e}"),
    })
}

#[cfg(test)]
mod tests {
    // Goal: token messages encoded together into one buffer are, each, the bytes the message
    // encodes to alone. Method: messages of differing lengths and escapes, compared with
    // `protocol::encode` one by one.

    use super::*;

    #[test]
    fn messages_encoded_together_are_each_what_it_encodes_to_alone() {
        let texts = [
            "a",
            "",
            " longer text",
            "quote \" and \\ and \n",
            "é 漢字 🙂",
        ];
        let messages: Vec<TokenMessage<'_>> = (0u64..)
            .zip(texts.iter().cycle().take(40))
            .map(|(i, t)| TokenMessage::new("req-1", t, i))
            .collect();
        let together = encode_all(&messages).map_err(|_| "encoding").unwrap();
        assert_eq!(together.len(), messages.len());
        for (payload, message) in together.iter().zip(&messages) {
            let alone = protocol::encode(message).unwrap();
            assert_eq!(payload.as_ref(), alone.as_slice());
        }
        assert!(encode_all(&[]).map_err(|_| "encoding").unwrap().is_empty());
    }
}
