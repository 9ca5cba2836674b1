// Goal: the HTTP server's accept loop never spins: while accepting fails (out of file
// descriptors, say) it waits between attempts, those waits double up to a cap, one warning
// tells of a burst of failures, and the first success ends the burst. A connection that fails
// before it is accepted is no reason to wait. A stop ends the loop even during a wait.
// Method: the loop runs on a paused clock against a scripted stand-in for the listener that
// records the time of every attempt; a tracing layer records what the loop logs.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Level;
use tracing_subscriber::layer::{Context, SubscriberExt as _};

use super::{Accept, accept_loop};
use crate::clock::{Clock, SystemClock};
use crate::limits::{HTTP_ACCEPT_BACKOFF_MAX, HTTP_ACCEPT_BACKOFF_MIN};

/// What one accept does: fail with this kind, or succeed (`None`). Past the script, accepts
/// wait for ever.
type Step = Option<ErrorKind>;

/// A listener that plays a script and records when each accept was attempted.
struct Scripted {
    steps: Mutex<VecDeque<Step>>,
    attempts: watch::Sender<Vec<Instant>>,
}

impl Scripted {
    fn new(
        steps: impl IntoIterator<Item = Step>,
    ) -> (Arc<Scripted>, watch::Receiver<Vec<Instant>>) {
        let (attempts, seen) = watch::channel(Vec::new());
        let steps = Mutex::new(steps.into_iter().collect());
        (Arc::new(Scripted { steps, attempts }), seen)
    }
}

impl Accept for Scripted {
    type Stream = ();

    async fn accept(&self) -> std::io::Result<()> {
        // A real accept may be ready at once, too; yielding lets the test see each attempt.
        tokio::task::yield_now().await;
        let step = self.steps.lock().unwrap().pop_front();
        let Some(step) = step else {
            return std::future::pending().await;
        };
        self.attempts.send_modify(|a| a.push(SystemClock.now()));
        match step {
            Some(kind) => Err(kind.into()),
            None => Ok(()),
        }
    }
}

/// Records the level of every event logged.
#[derive(Clone, Default)]
struct Levels(Arc<Mutex<Vec<Level>>>);

impl Levels {
    fn count(&self, level: Level) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| **l == level)
            .count()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Levels {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        self.0.lock().unwrap().push(*event.metadata().level());
    }
}

/// Runs the accept loop over `steps` until `attempts` accepts were made; returns their times,
/// the connections served, what was logged, and the stop of the still running loop.
async fn run(
    steps: impl IntoIterator<Item = Step>,
    attempts: usize,
) -> (
    Vec<Instant>,
    usize,
    Levels,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (acceptor, mut seen) = Scripted::new(steps);
    let levels = Levels::default();
    let subscriber = tracing_subscriber::registry().with(levels.clone());
    let stop = CancellationToken::new();
    let served = Arc::new(Mutex::new(0usize));
    let task = tokio::spawn({
        let (stop, served) = (stop.clone(), served.clone());
        let dispatch = tracing::Dispatch::new(subscriber);
        tracing::instrument::WithSubscriber::with_subscriber(
            async move {
                accept_loop(&*acceptor, 7, &stop, |(), _permit| {
                    *served.lock().unwrap() += 1
                })
                .await;
            },
            dispatch,
        )
    });
    let times = seen
        .wait_for(|a| a.len() >= attempts)
        .await
        .unwrap()
        .clone();
    let served = *served.lock().unwrap();
    (times, served, levels, stop, task)
}

fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test(start_paused = true)]
async fn failing_accepts_back_off_up_to_the_cap_with_one_warning() {
    let failures = 12;
    let (times, served, levels, stop, task) =
        run(vec![Some(ErrorKind::Other); failures], failures).await;
    assert_eq!(served, 0);
    let gaps = gaps(&times);
    for (i, gap) in gaps.iter().enumerate() {
        // After the n-th failure in a row the loop waits between half of and the whole of
        // min(HTTP_ACCEPT_BACKOFF_MIN * 2^(n-1), HTTP_ACCEPT_BACKOFF_MAX).
        let cap = (HTTP_ACCEPT_BACKOFF_MIN * (1 << i)).min(HTTP_ACCEPT_BACKOFF_MAX);
        assert!(
            *gap >= cap / 2 && *gap <= cap,
            "wait {gap:?} after failure {} is outside [{:?}, {cap:?}]; all waits: {gaps:?}",
            i + 1,
            cap / 2
        );
    }
    assert!(
        gaps.last().unwrap() >= &(HTTP_ACCEPT_BACKOFF_MAX / 2),
        "the waits reach the cap: {gaps:?}"
    );
    assert_eq!(levels.count(Level::WARN), 1, "one warning for the burst");

    // The loop now waits before its next attempt; a stop ends it at once.
    let stopped_at = SystemClock.now();
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        SystemClock.now(),
        stopped_at,
        "the stop did not wait for the backoff"
    );
}

#[tokio::test(start_paused = true)]
async fn a_success_ends_the_burst_and_the_next_one_starts_from_the_first_wait() {
    let fail = Some(ErrorKind::Other);
    let steps = [fail, fail, fail, None, fail, fail, fail];
    let (times, served, levels, stop, task) = run(steps, steps.len()).await;
    assert_eq!(served, 1);
    let gaps = gaps(&times);
    assert_eq!(
        gaps[3],
        Duration::ZERO,
        "after a success the loop accepts at once: {gaps:?}"
    );
    assert!(
        gaps[4] <= HTTP_ACCEPT_BACKOFF_MIN,
        "the second burst starts from the first wait: {gaps:?}"
    );
    assert_eq!(levels.count(Level::WARN), 2, "one warning per burst");
    assert_eq!(
        levels.count(Level::INFO),
        1,
        "one notice that accepting works again"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_connection_lost_before_its_accept_is_no_reason_to_wait() {
    let steps = [
        Some(ErrorKind::ConnectionAborted),
        Some(ErrorKind::ConnectionReset),
        Some(ErrorKind::ConnectionAborted),
        None,
    ];
    let (times, served, levels, stop, task) = run(steps, steps.len()).await;
    assert_eq!(served, 1);
    assert!(gaps(&times).iter().all(Duration::is_zero), "{times:?}");
    assert_eq!(levels.count(Level::WARN), 0);
    stop.cancel();
    task.await.unwrap();
}
