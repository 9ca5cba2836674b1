//! The work queue on JetStream: a work-queue stream, one durable pull consumer per filter
//! subject, pulls with a count and an expiry, and double acknowledgements.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, context::CreateStreamErrorKind, stream};
use async_trait::async_trait;
use futures::StreamExt;
use tracing::{info, warn};

use crate::transport::work_queue::{
    ConsumerSpec, Settle, WorkBatch, WorkItem, WorkQueue, WorkQueueSpec,
};
use crate::transport::{InboundMessage, TransportError};

/// Creates (or finds) the stream and the consumer, and checks the stream is a work queue.
pub(super) async fn open(
    client: &async_nats::Client,
    spec: &WorkQueueSpec,
    consumer: &ConsumerSpec,
) -> Result<Arc<dyn WorkQueue>, TransportError> {
    let context = jetstream::new(client.clone());
    let config = stream::Config {
        name: spec.stream.clone(),
        subjects: spec.subjects.clone(),
        retention: stream::RetentionPolicy::WorkQueue,
        discard: stream::DiscardPolicy::New,
        max_age: spec.max_age,
        max_messages: spec.max_messages,
        max_bytes: spec.max_bytes,
        num_replicas: spec.replicas,
        storage: stream::StorageType::File,
        // The server refuses a duplicate window longer than the maximum age.
        duplicate_window: spec.max_age.min(Duration::from_secs(120)),
        ..Default::default()
    };
    let stream = context
        .get_or_create_stream(config)
        .await
        .map_err(|err| stream_error(&spec.stream, &err))?;
    let found = &stream.cached_info().config;
    if found.retention != stream::RetentionPolicy::WorkQueue {
        return Err(TransportError::Refused {
            reason: format!(
                "stream {} exists with {:?} retention; the work queue needs work-queue retention \
                 (give modelSubjects.stream another name, or recreate the stream)",
                spec.stream, found.retention
            ),
        });
    }
    if found.num_replicas != spec.replicas || found.max_age != spec.max_age {
        warn!(
            stream = %spec.stream,
            replicas = found.num_replicas,
            max_age_ms = crate::clock::millis(found.max_age),
            "the stream exists with other settings than configured; using it as it is"
        );
    }
    let pull = consumer::pull::Config {
        durable_name: Some(consumer.name.clone()),
        filter_subject: consumer.filter_subject.clone(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: consumer.ack_wait,
        max_deliver: consumer.max_deliver,
        ..Default::default()
    };
    let taken = stream
        .get_or_create_consumer(&consumer.name, pull)
        .await
        .map_err(|err| TransportError::Refused {
            reason: format!(
                "cannot create or find consumer {} of stream {} for {}: {err}",
                consumer.name, spec.stream, consumer.filter_subject
            ),
        })?;
    info!(
        stream = %spec.stream,
        consumer = %consumer.name,
        subject = %consumer.filter_subject,
        "work queue consumer ready"
    );
    Ok(Arc::new(Puller { consumer: taken }))
}

fn stream_error(name: &str, err: &jetstream::context::CreateStreamError) -> TransportError {
    let reason = match err.kind() {
        CreateStreamErrorKind::JetStreamUnavailable => format!(
            "JetStream is not available to this account (no answer on $JS.API; start the \
             server with JetStream enabled, or give the account JetStream): cannot create or \
             find stream {name}"
        ),
        _ => format!("cannot create or find stream {name}: {err}"),
    };
    TransportError::Refused { reason }
}

struct Puller {
    consumer: consumer::Consumer<consumer::pull::Config>,
}

#[async_trait]
impl WorkQueue for Puller {
    async fn pull(&self, max: usize, wait: Duration) -> Result<WorkBatch, TransportError> {
        let batch = self
            .consumer
            .batch()
            .max_messages(max)
            .expires(wait)
            .messages()
            .await
            .map_err(|err| TransportError::Refused {
                reason: format!("pull refused: {err}"),
            })?;
        Ok(Box::pin(batch.map(|taken| match taken {
            Ok(message) => Ok(item(message)),
            Err(err) => Err(TransportError::Refused {
                reason: format!("pull broken: {err}"),
            }),
        })))
    }
}

fn item(message: jetstream::Message) -> WorkItem {
    let (published_unix_ms, deliveries) = match message.info() {
        Ok(info) => (
            u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).ok(),
            u64::try_from(info.delivered).unwrap_or(1),
        ),
        Err(_) => (None, 1),
    };
    let inbound = InboundMessage {
        subject: message.subject.to_string(),
        reply: None,
        payload: message.payload.clone(),
    };
    WorkItem {
        message: inbound,
        published_unix_ms,
        deliveries,
        settle: Box::new(Taken { message }),
    }
}

struct Taken {
    message: jetstream::Message,
}

impl std::fmt::Debug for Taken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Taken")
            .field("subject", &self.message.subject)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Settle for Taken {
    async fn ack(&self) -> Result<(), TransportError> {
        self.message
            .double_ack()
            .await
            .map_err(|err| TransportError::Refused {
                reason: format!("acknowledgement not confirmed: {err}"),
            })
    }

    async fn release(&self) -> Result<(), TransportError> {
        self.message
            .ack_with(AckKind::Nak(None))
            .await
            .map_err(|err| TransportError::Refused {
                reason: format!("release not sent: {err}"),
            })
    }
}
