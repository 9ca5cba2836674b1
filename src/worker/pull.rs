//! The model subjects as a work queue (`modelSubjects.mode: jetstream`): requests for
//! `inference.{model}` wait in a stream, and every worker serving the model pulls from one
//! durable consumer per model, as many as it has free run slots for it and never more, so a
//! request waits where any free worker can take it.
//!
//! A pull asks for `free − outstanding` messages and ends when they have arrived or after
//! [`WORK_QUEUE_PULL_WAIT`]; the run loop pulls again whenever slots free up. A message is
//! acknowledged when its request starts (or ends without running: see the dispatcher), so a
//! worker that dies loses only what it was running; what it had taken and not started goes to
//! another worker after the ack wait. A draining worker pulls no more, and hands back at once
//! whatever its last pulls still bring.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{SelectAll, Stream, StreamExt};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::WorkQueueConfig;
use crate::limits::{WORK_QUEUE_PULL_WAIT, WORK_QUEUE_RETRY_MAX};
use crate::protocol::subject::{model_inference, model_token};
use crate::transport::work_queue::{ConsumerSpec, WorkBatch, WorkItem, WorkQueue, WorkQueueSpec};
use crate::transport::{Transport, TransportError};

/// What a pull brought.
pub(crate) enum Pulled {
    /// A message for `model`.
    Item {
        /// The model whose consumer it came from.
        model: String,
        /// The message.
        item: WorkItem,
    },
    /// A pull of `model` ended with `left` of its messages not delivered (expired, or broken
    /// by `error`).
    Ended {
        model: String,
        left: usize,
        error: Option<TransportError>,
    },
}

/// One model's consumer.
#[derive(Default)]
struct Consumer {
    /// Ready to pull, once created.
    queue: Option<Arc<dyn WorkQueue>>,
    /// Messages asked for by the pulls still open, not delivered yet.
    outstanding: usize,
    /// Failures in a row (creating the consumer or pulling).
    failures: u32,
    /// No pull, or creation, before this.
    retry_at: Option<Instant>,
}

/// The worker's consumers of the model work queue.
pub(crate) struct ModelQueues {
    stream: WorkQueueSpec,
    ack_wait: Duration,
    max_deliver: i64,
    consumers: BTreeMap<String, Consumer>,
    pulls: SelectAll<Pin<Box<dyn Stream<Item = Pulled> + Send>>>,
}

impl ModelQueues {
    /// Consumers for these model ids, not created yet.
    pub(crate) fn new<'a>(
        config: &WorkQueueConfig,
        models: impl IntoIterator<Item = &'a String>,
    ) -> ModelQueues {
        ModelQueues {
            stream: WorkQueueSpec {
                stream: config.stream.clone(),
                subjects: config.subjects.clone(),
                max_age: config.max_age,
                max_messages: i64::try_from(config.max_messages).unwrap_or(i64::MAX),
                max_bytes: i64::try_from(config.max_bytes).unwrap_or(i64::MAX),
                replicas: config.replicas,
            },
            ack_wait: config.ack_wait,
            max_deliver: i64::try_from(config.max_deliver).unwrap_or(i64::MAX),
            consumers: models
                .into_iter()
                .map(|m| (m.clone(), Consumer::default()))
                .collect(),
            pulls: SelectAll::new(),
        }
    }

    /// Creates (or finds) the stream and every model's consumer. The first failure is
    /// returned: at start, a server or account without JetStream, or without the permission,
    /// is a configuration error.
    pub(crate) async fn open(
        &mut self,
        transport: &Arc<dyn Transport>,
    ) -> Result<(), TransportError> {
        let models: Vec<String> = self.consumers.keys().cloned().collect();
        for model in models {
            let queue = transport
                .work_queue(&self.stream, &self.consumer_spec(&model))
                .await?;
            if let Some(consumer) = self.consumers.get_mut(&model) {
                consumer.queue = Some(queue);
            }
        }
        if !self.consumers.is_empty() {
            info!(
                stream = %self.stream.stream,
                models = self.consumers.len(),
                "pulling the model work queue"
            );
        }
        Ok(())
    }

    /// Adds consumers for those of `models` not pulled yet (a rescan found them); they are
    /// created on the next [`ModelQueues::refill`].
    pub(crate) fn add<'a>(&mut self, models: impl IntoIterator<Item = &'a String>) {
        for model in models {
            if !self.consumers.contains_key(model) {
                info!(%model, "a new model's work queue consumer");
                self.consumers.insert(model.clone(), Consumer::default());
            }
        }
    }

    fn consumer_spec(&self, model: &str) -> ConsumerSpec {
        ConsumerSpec {
            name: model_token(model),
            filter_subject: model_inference(model),
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
        }
    }

    /// Pulls, for every model, as many messages as `free` says it has room for beyond what
    /// open pulls still bring; creates the consumers that failed before, when their retry is
    /// due.
    pub(crate) async fn refill(
        &mut self,
        transport: &Arc<dyn Transport>,
        free: impl Fn(&str) -> usize,
        now: Instant,
    ) {
        let stream = &self.stream;
        let mut specs = BTreeMap::new();
        for (model, consumer) in &mut self.consumers {
            if consumer.retry_at.is_some_and(|at| now < at) {
                continue;
            }
            // Due: a failure sets it again.
            consumer.retry_at = None;
            let want = free(model).saturating_sub(consumer.outstanding);
            if want > 0 || consumer.queue.is_none() {
                specs.insert(model.clone(), want);
            }
        }
        for (model, want) in specs {
            let spec = self.consumer_spec(&model);
            let Some(consumer) = self.consumers.get_mut(&model) else {
                continue;
            };
            let queue = match &consumer.queue {
                Some(queue) => queue.clone(),
                None => match transport.work_queue(stream, &spec).await {
                    Ok(queue) => {
                        consumer.queue = Some(queue.clone());
                        consumer.failures = 0;
                        consumer.retry_at = None;
                        queue
                    }
                    Err(err) => {
                        warn!(%model, cause = %err, "cannot create the model's consumer");
                        consumer.fail(now);
                        continue;
                    }
                },
            };
            if want == 0 {
                continue;
            }
            match queue.pull(want, WORK_QUEUE_PULL_WAIT).await {
                Ok(batch) => {
                    consumer.outstanding += want;
                    consumer.retry_at = None;
                    self.pulls.push(Box::pin(tagged(model, batch, want)));
                }
                Err(err) => {
                    warn!(%model, cause = %err, "pull refused");
                    consumer.fail(now);
                }
            }
        }
    }

    /// When the next failed creation or pull is retried.
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.consumers.values().filter_map(|c| c.retry_at).min()
    }

    /// Whether no pull is open (a draining worker may leave).
    pub(crate) fn is_idle(&self) -> bool {
        self.pulls.is_empty()
    }

    /// The next message of an open pull, or the end of one; waits forever while none is open.
    pub(crate) async fn next(&mut self, now: impl Fn() -> Instant) -> Pulled {
        let Some(pulled) = self.pulls.next().await else {
            return std::future::pending().await;
        };
        match &pulled {
            Pulled::Item { model, .. } => {
                if let Some(consumer) = self.consumers.get_mut(model) {
                    consumer.outstanding = consumer.outstanding.saturating_sub(1);
                    consumer.failures = 0;
                }
            }
            Pulled::Ended { model, left, error } => {
                if let Some(consumer) = self.consumers.get_mut(model) {
                    consumer.outstanding = consumer.outstanding.saturating_sub(*left);
                    if let Some(err) = error {
                        warn!(%model, cause = %err, "pull broken");
                        consumer.fail(now());
                    }
                }
            }
        }
        pulled
    }
}

impl Consumer {
    fn fail(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let pause = Duration::from_millis(250)
            .saturating_mul(1 << self.failures.min(5))
            .min(WORK_QUEUE_RETRY_MAX);
        self.retry_at = Some(now + pause);
    }
}

/// `batch`'s messages for `model`, then its end with how many of the `asked` did not come.
fn tagged(model: String, batch: WorkBatch, asked: usize) -> impl Stream<Item = Pulled> + Send {
    futures::stream::unfold(Some((batch, asked)), move |state| {
        let model = model.clone();
        async move {
            let (mut batch, left) = state?;
            match batch.next().await {
                Some(Ok(item)) => Some((
                    Pulled::Item { model, item },
                    Some((batch, left.saturating_sub(1))),
                )),
                Some(Err(error)) => Some((
                    Pulled::Ended {
                        model,
                        left,
                        error: Some(error),
                    },
                    None,
                )),
                None => Some((
                    Pulled::Ended {
                        model,
                        left,
                        error: None,
                    },
                    None,
                )),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    // Goal: the consumers ask for exactly the free slots beyond what open pulls still bring,
    // never more; a pull's end gives back what did not come; a refused pull or consumer is
    // retried after its pause, not before.
    // Method: a transport whose work queue records every pull and hands out batches the test
    // feeds and ends, driven with a paused clock.

    use std::sync::Mutex;

    use async_trait::async_trait;
    use bytes::Bytes;
    use futures::StreamExt;
    use futures::channel::mpsc;
    use tokio::sync::watch;

    use super::*;
    use crate::clock::{Clock, SystemClock};
    use crate::config::{DEFAULT_WORK_QUEUE_STREAM, WorkQueueConfig};
    use crate::transport::work_queue::Settle;
    use crate::transport::{ConnectionState, InboundMessage, Subscription};

    /// Each pull: what it asked for, and the sender that feeds its batch (dropped: it ends).
    type Pulls = Arc<
        Mutex<
            Vec<(
                usize,
                mpsc::UnboundedSender<Result<WorkItem, TransportError>>,
            )>,
        >,
    >;

    struct FakeQueue {
        pulls: Pulls,
        refuse: Arc<Mutex<bool>>,
    }

    #[async_trait]
    impl WorkQueue for FakeQueue {
        async fn pull(&self, max: usize, _wait: Duration) -> Result<WorkBatch, TransportError> {
            if *self.refuse.lock().unwrap() {
                return Err(TransportError::Disconnected);
            }
            let (tx, rx) = mpsc::unbounded();
            self.pulls.lock().unwrap().push((max, tx));
            Ok(Box::pin(rx))
        }
    }

    struct FakeTransport {
        queue: Arc<FakeQueue>,
        state: watch::Sender<ConnectionState>,
    }

    #[async_trait]
    impl Transport for FakeTransport {
        async fn publish(&self, _: String, _: Bytes) -> Result<(), TransportError> {
            Err(TransportError::Closed)
        }
        async fn publish_if_listened(&self, _: String, _: Bytes) -> Result<bool, TransportError> {
            Err(TransportError::Closed)
        }
        async fn subscribe(
            &self,
            _: String,
            _: Option<String>,
        ) -> Result<Subscription, TransportError> {
            Err(TransportError::Closed)
        }
        async fn flush(&self) -> Result<(), TransportError> {
            Ok(())
        }
        async fn work_queue(
            &self,
            _: &WorkQueueSpec,
            _: &ConsumerSpec,
        ) -> Result<Arc<dyn WorkQueue>, TransportError> {
            Ok(self.queue.clone())
        }
        fn connection(&self) -> watch::Receiver<ConnectionState> {
            self.state.subscribe()
        }
    }

    #[derive(Debug)]
    struct Noop;

    #[async_trait]
    impl Settle for Noop {
        async fn ack(&self) -> Result<(), TransportError> {
            Ok(())
        }
        async fn release(&self) -> Result<(), TransportError> {
            Ok(())
        }
    }

    fn item() -> WorkItem {
        WorkItem {
            message: InboundMessage {
                subject: "inference.m".into(),
                reply: None,
                payload: Bytes::from_static(b"{}"),
            },
            published_unix_ms: None,
            deliveries: 1,
            settle: Box::new(Noop),
        }
    }

    fn config() -> WorkQueueConfig {
        WorkQueueConfig {
            stream: DEFAULT_WORK_QUEUE_STREAM.into(),
            subjects: vec!["inference.>".into()],
            replicas: 1,
            max_messages: 10,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
            ack_wait: Duration::from_secs(1),
            max_deliver: 2,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pulls_ask_for_the_free_slots_beyond_what_open_pulls_bring() {
        let pulls: Pulls = Arc::default();
        let refuse = Arc::new(Mutex::new(false));
        let queue = Arc::new(FakeQueue {
            pulls: pulls.clone(),
            refuse: refuse.clone(),
        });
        let transport: Arc<dyn Transport> = Arc::new(FakeTransport {
            queue,
            state: watch::Sender::new(ConnectionState {
                connected: true,
                reconnects: 0,
            }),
        });
        let model = "m".to_owned();
        let mut queues = ModelQueues::new(&config(), [&model]);
        queues.open(&transport).await.unwrap();
        let asked = |pulls: &Pulls| {
            pulls
                .lock()
                .unwrap()
                .iter()
                .map(|p| p.0)
                .collect::<Vec<_>>()
        };
        let clock = SystemClock;
        let now = || clock.now();

        queues.refill(&transport, |_| 3, now()).await;
        assert_eq!(asked(&pulls), [3]);
        // Three are on their way: three free slots ask for nothing more, four for one.
        queues.refill(&transport, |_| 3, now()).await;
        assert_eq!(asked(&pulls), [3]);
        queues.refill(&transport, |_| 4, now()).await;
        assert_eq!(asked(&pulls), [3, 1]);
        assert!(!queues.is_idle());

        // The first pull brings one, then ends: two of its three did not come.
        let first = pulls.lock().unwrap().remove(0).1;
        first.unbounded_send(Ok(item())).unwrap();
        drop(first);
        assert!(matches!(queues.next(now).await, Pulled::Item { .. }));
        assert!(matches!(
            queues.next(now).await,
            Pulled::Ended {
                left: 2,
                error: None,
                ..
            }
        ));
        // One still on its way (the second pull); the one that came now runs.
        queues.refill(&transport, |_| 2, now()).await;
        assert_eq!(asked(&pulls), [1, 1]);

        // A broken pull: given back, and the consumer pauses before it pulls again.
        let second = pulls.lock().unwrap().remove(0).1;
        second
            .unbounded_send(Err(TransportError::Disconnected))
            .unwrap();
        assert!(matches!(
            queues.next(now).await,
            Pulled::Ended {
                left: 1,
                error: Some(_),
                ..
            }
        ));
        let retry = queues.next_retry().expect("a retry after a broken pull");
        queues.refill(&transport, |_| 5, now()).await;
        assert_eq!(asked(&pulls), [1], "nothing before the retry is due");
        tokio::time::sleep_until(retry).await;
        queues.refill(&transport, |_| 5, now()).await;
        assert_eq!(asked(&pulls), [1, 4], "five free, one on its way");
        assert_eq!(queues.next_retry(), None);

        // A refused pull pauses too; the pause grows with the failures in a row.
        *refuse.lock().unwrap() = true;
        let before = pulls.lock().unwrap().len();
        queues.refill(&transport, |_| 9, now()).await;
        let first_pause = queues.next_retry().unwrap() - now();
        tokio::time::sleep(first_pause).await;
        queues.refill(&transport, |_| 9, now()).await;
        let second_pause = queues.next_retry().unwrap() - now();
        assert!(
            second_pause > first_pause,
            "{second_pause:?} after {first_pause:?}"
        );
        assert_eq!(pulls.lock().unwrap().len(), before);
        // Every open pull ended: idle.
        pulls.lock().unwrap().clear();
        while !queues.is_idle() {
            let _ = queues.pulls.next().await;
        }
    }
}
