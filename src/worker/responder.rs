//! Publishes one response stream on `response.{requestId}`, in order, protecting its first
//! message from a late subscriber.
//!
//! The existing controller publishes a request and subscribes to its response subject only
//! afterwards, so a fast worker's first messages would reach nobody. The first message of every
//! stream (a token, or a terminal error) is therefore published only once somebody listens,
//! checked with [`Transport::publish_if_listened`] and retried with a short backoff up to the
//! configured wait. Later messages follow on the same connection, so they arrive after it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tracing::warn;

use crate::clock::Clock;
use crate::protocol::{self, subject};
use crate::transport::{Transport, TransportError};

/// First delay between two listener checks; it doubles up to [`CHECK_DELAY_MAX`].
const CHECK_DELAY_MIN: Duration = Duration::from_millis(1);
/// Longest delay between two listener checks.
const CHECK_DELAY_MAX: Duration = Duration::from_millis(50);

/// The publisher of one response stream.
pub(crate) struct Responder {
    transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    subject: String,
    /// Longest wait for a listener before the first message; zero disables the check.
    late_subscriber_wait: Duration,
    /// Whether the first message is still to be sent.
    first_pending: bool,
}

impl Responder {
    /// A responder for `request_id`, whose id has passed `subject::check_token`.
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        clock: Arc<dyn Clock>,
        request_id: &str,
        late_subscriber_wait: Duration,
    ) -> Responder {
        Responder {
            transport,
            clock,
            subject: subject::response(request_id),
            late_subscriber_wait,
            first_pending: true,
        }
    }

    /// Publishes one message of the stream; the first waits for a listener (see the module).
    pub(crate) async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), TransportError> {
        let payload =
            Bytes::from(
                protocol::encode(message).map_err(|e| TransportError::Refused {
                    reason: format!("cannot encode a response: {e}"),
                })?,
            );
        if !self.first_pending {
            return self.transport.publish(self.subject.clone(), payload).await;
        }
        self.first_pending = false;
        self.send_first(payload).await
    }

    async fn send_first(&self, payload: Bytes) -> Result<(), TransportError> {
        if self.late_subscriber_wait.is_zero() {
            return self.transport.publish(self.subject.clone(), payload).await;
        }
        let deadline = self.clock.now() + self.late_subscriber_wait;
        let mut delay = CHECK_DELAY_MIN;
        loop {
            if self
                .transport
                .publish_if_listened(self.subject.clone(), payload.clone())
                .await?
            {
                return Ok(());
            }
            let now = self.clock.now();
            if now >= deadline {
                warn!(
                    subject = %self.subject,
                    wait_ms = crate::clock::millis(self.late_subscriber_wait),
                    "nobody listens on the response subject; publishing anyway"
                );
                return self.transport.publish(self.subject.clone(), payload).await;
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(CHECK_DELAY_MAX);
        }
    }

    /// Waits until everything sent so far is written to the server.
    pub(crate) async fn flush(&self) -> Result<(), TransportError> {
        self.transport.flush().await
    }
}
