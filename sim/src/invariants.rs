//! The invariants every scenario is held to, checked on a world's [`Trace`](crate::Trace)
//! while it runs and at the end. A broken invariant is a [`Violation`] value, never a panic, so
//! the mutant proof can collect them. The worker under check and its configured bounds come in
//! as [`Limits`]; this module knows nothing of how a world is built.
//!
//! The worker's promises are checked on what the worker handed to its transport (the trace of
//! node `worker`), because a link loss legitimately loses what was in flight — exactly as with
//! NATS. What the broker saw is checked against it where no link was lost (`broker-fifo`), and
//! what the controller received must never be a `done` over missing tokens (`done-is-complete`).
//!
//! | name | promise |
//! |---|---|
//! | `one-terminal` | every request the worker received while serving ends with exactly one `done` or `error` on `response.{id}` (unless its host crashed, or the worker's link was down at some moment between the request's deadline and that deadline plus [`Limits::slack`]: then nobody is left to tell) |
//! | `nothing-after-terminal` | no message of a request follows its terminal |
//! | `contiguous-tokens` | token indices run 0, 1, 2, … |
//! | `stream-fields` | every message of `response.{id}` names request `id`, and `done`'s `totalTokens` is the number of tokens before it |
//! | `deadline` | the terminal is published by the request's deadline plus [`Limits::slack`] |
//! | `drain-waits` | a drain ends a request it had accepted with `WORKER_SHUTDOWN` only once `drainTimeoutMs` has passed |
//! | `legal-lifecycle` | every lifecycle move is one `Lifecycle::can_become` allows, from the state the worker was in |
//! | `reregister-before-ready` | after every (re)connection, `worker.register` is published before the worker is `ready` again |
//! | `queue-bound` | no heartbeat reports more waiting requests than the configured bound; a flood past the bound gets `QUEUE_FULL` ([`check_flood`]) |
//! | `latched-cancel` | a request whose cancel arrived before it ends `CANCELLED` |
//! | `broker-fifo` | while a client's link was never lost, the broker received exactly its publishes, in order |
//! | `done-is-complete` | a `done` the controller receives with `totalTokens: n` follows its receipt of every token index below `n`: a stream that lost tokens on the way ends with an error, never with `done` |
//! | `engine-capacity` | the engine refused no generation for want of capacity: the worker never handed it more of a model than it runs (the engine's own count, checked by `World::finish`) |
//!
//! The rules of one stream (`contiguous-tokens`, `stream-fields`) are the library client's
//! own, `mlx_worker::client::StreamCheck`, applied to what the worker published.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use mlx_worker::client::{StreamCheck, StreamViolation};
use mlx_worker::config::NodeConfig;
use mlx_worker::lifecycle::Lifecycle;
use mlx_worker::protocol::{StreamMessage, WorkerHeartbeat, subject};
use serde::Deserialize;

use crate::trace::{Event, EventKind};

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The invariant's name (see the module documentation).
    pub invariant: &'static str,
    /// What was seen, with the simulated time.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}

/// The worker under check and the configured limits the invariants check against.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The worker's id: its requests arrive on `worker.{id}.inference`, cancels on
    /// `worker.{id}.cancel`.
    pub worker_id: String,
    /// Waiting requests at most.
    pub queue_depth_max: usize,
    /// A request's deadline when it asks for none.
    pub request_timeout: Duration,
    /// Time a drain waits.
    pub drain_timeout: Duration,
    /// Time allowed past a deadline for the terminal to be published.
    pub slack: Duration,
}

impl Limits {
    /// The limits of the worker `worker_id` configured with `node`.
    pub fn from_node(worker_id: &str, node: &NodeConfig) -> Limits {
        Limits {
            worker_id: worker_id.to_owned(),
            queue_depth_max: node.queue_depth_max,
            request_timeout: node.request_timeout,
            drain_timeout: node.drain_timeout,
            // The terminal may wait for a listener, then goes through one round trip.
            slack: node.late_subscriber_wait + Duration::from_millis(700),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestFields {
    request_id: Option<String>,
    timeout_ms: Option<u64>,
}

struct Open {
    received_at: Duration,
    deadline: Duration,
    owed: bool,
    latched: bool,
    /// The stream's rules, as the worker published it.
    stream: StreamCheck,
    before_drain: bool,
}

fn lifecycle(name: &str) -> Option<Lifecycle> {
    [
        Lifecycle::Idle,
        Lifecycle::Connecting,
        Lifecycle::Registering,
        Lifecycle::Ready,
        Lifecycle::Draining,
        Lifecycle::Stopped,
    ]
    .into_iter()
    .find(|l| l.as_str() == name)
}

/// Checks every invariant on `events` with the worker's `limits`. `at_end` is informational:
/// liveness (`deadline`) is judged against the time of the last event either way, so the check
/// is as valid during a run as after it.
pub fn check(events: &[Event], limits: &Limits, at_end: bool) -> Vec<Violation> {
    let _ = at_end;
    let mut out = Vec::new();
    let mut v = |invariant: &'static str, at: Duration, detail: String| {
        out.push(Violation {
            invariant,
            detail: format!("at {} ms: {detail}", at.as_millis()),
        });
    };
    let inference = subject::inference(&limits.worker_id);
    let cancel = subject::cancel(&limits.worker_id);
    let now = events.last().map(|e| e.at).unwrap_or_default();

    let mut state = Lifecycle::Idle;
    let mut registered = false;
    let mut drain_at: Option<Duration> = None;
    let mut open: BTreeMap<String, Open> = BTreeMap::new();
    let mut cancels: BTreeMap<String, Duration> = BTreeMap::new();
    // The worker's link: (time, up) at each change.
    let mut link: Vec<(Duration, bool)> = Vec::new();
    // Token indices the controller received, by response subject.
    let mut delivered: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();

    for e in events {
        match (&e.node[..], &e.kind) {
            ("worker", EventKind::Incarnation | EventKind::Crashed) => {
                // The host died or restarted: what it owed died with it.
                open.clear();
                state = Lifecycle::Idle;
                registered = false;
                drain_at = None;
            }
            ("worker", EventKind::Lifecycle { from, to }) => {
                let (Some(from), Some(to)) = (lifecycle(from), lifecycle(to)) else {
                    v(
                        "legal-lifecycle",
                        e.at,
                        format!("unknown state in {from} -> {to}"),
                    );
                    continue;
                };
                if from != state || !from.can_become(to) {
                    v(
                        "legal-lifecycle",
                        e.at,
                        format!("move {from} -> {to} while the worker was {state}"),
                    );
                }
                state = to;
                match to {
                    Lifecycle::Connecting => registered = false,
                    Lifecycle::Ready if !registered => v(
                        "reregister-before-ready",
                        e.at,
                        "ready without publishing worker.register since the link came back"
                            .to_owned(),
                    ),
                    Lifecycle::Draining => drain_at = Some(e.at),
                    _ => {}
                }
            }
            ("worker", EventKind::Received { subject, payload }) if *subject == inference => {
                let Ok(fields) = serde_json::from_slice::<RequestFields>(payload) else {
                    continue;
                };
                let Some(id) = fields.request_id else {
                    continue;
                };
                if open.contains_key(&id) {
                    continue; // A duplicate: answered on its reply subject only.
                }
                let timeout = fields.timeout_ms.map_or(limits.request_timeout, |ms| {
                    Duration::from_millis(ms).min(limits.request_timeout)
                });
                let latched = cancels.remove(&id).is_some();
                let serving = matches!(
                    state,
                    Lifecycle::Connecting | Lifecycle::Registering | Lifecycle::Ready
                );
                open.insert(
                    id.clone(),
                    Open {
                        received_at: e.at,
                        deadline: e.at + timeout,
                        owed: serving,
                        latched,
                        stream: StreamCheck::new(id),
                        before_drain: drain_at.is_none(),
                    },
                );
            }
            ("worker", EventKind::Received { subject, payload }) if *subject == cancel => {
                if let Ok(RequestFields {
                    request_id: Some(id),
                    ..
                }) = serde_json::from_slice(payload)
                    && !open.contains_key(&id)
                {
                    cancels.insert(id, e.at);
                }
            }
            ("worker", EventKind::Connected { .. }) => link.push((e.at, true)),
            ("worker", EventKind::Disconnected) => link.push((e.at, false)),
            ("controller", EventKind::Received { subject, payload }) => {
                received(&mut delivered, subject, payload, e.at, &mut v);
            }
            (
                "worker",
                EventKind::Published {
                    subject, payload, ..
                },
            ) => {
                if subject == "worker.register" {
                    registered = true;
                } else if subject == "worker.heartbeat" {
                    if let Ok(hb) = serde_json::from_slice::<WorkerHeartbeat>(payload)
                        && hb.metrics.queue_depth as usize > limits.queue_depth_max
                    {
                        v(
                            "queue-bound",
                            e.at,
                            format!(
                                "heartbeat reports {} waiting, bound {}",
                                hb.metrics.queue_depth, limits.queue_depth_max
                            ),
                        );
                    }
                } else if let Some(id) = subject.strip_prefix("response.") {
                    let Ok(msg) = serde_json::from_slice::<StreamMessage>(payload) else {
                        v("one-terminal", e.at, format!("{id}: undecodable message"));
                        continue;
                    };
                    let Some(o) = open.get_mut(id) else {
                        let what = if msg.is_terminal() {
                            "one-terminal"
                        } else {
                            "nothing-after-terminal"
                        };
                        v(what, e.at, format!("{id}: {msg:?} after the stream ended"));
                        continue;
                    };
                    if let Err(broken) = o.stream.push(&msg) {
                        let invariant = match broken {
                            StreamViolation::TokenIndex { .. } => "contiguous-tokens",
                            // A closed stream has no entry here; this one is still open.
                            StreamViolation::AfterTerminal { .. } => "nothing-after-terminal",
                            StreamViolation::WrongRequest { .. }
                            | StreamViolation::TokenCount { .. } => "stream-fields",
                        };
                        v(invariant, e.at, format!("{id}: {broken}"));
                    }
                    match msg {
                        StreamMessage::Token { .. } => {}
                        terminal => {
                            let code = match &terminal {
                                StreamMessage::Error { code, .. } => code.as_str(),
                                _ => "done",
                            };
                            if o.owed && e.at > o.deadline + limits.slack {
                                v(
                                    "deadline",
                                    e.at,
                                    format!(
                                        "{id}: terminal {} ms after receipt, deadline {} ms + slack",
                                        (e.at - o.received_at).as_millis(),
                                        (o.deadline - o.received_at).as_millis()
                                    ),
                                );
                            }
                            if o.latched && code != "CANCELLED" {
                                v(
                                    "latched-cancel",
                                    e.at,
                                    format!("{id}: cancelled before it arrived, ended {code}"),
                                );
                            }
                            if code == "WORKER_SHUTDOWN"
                                && o.before_drain
                                && let Some(d) = drain_at
                                && e.at + Duration::from_millis(1) < d + limits.drain_timeout
                            {
                                v(
                                    "drain-waits",
                                    e.at,
                                    format!(
                                        "{id}: WORKER_SHUTDOWN {} ms into a {} ms drain",
                                        (e.at - d).as_millis(),
                                        limits.drain_timeout.as_millis()
                                    ),
                                );
                            }
                            open.remove(id);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    for (id, o) in &open {
        if o.owed
            && now > o.deadline + limits.slack
            && !down_between(&link, o.deadline, o.deadline + limits.slack)
        {
            v(
                "one-terminal",
                now,
                format!(
                    "{id}: received at {} ms, no terminal by {} ms (deadline {} ms + slack)",
                    o.received_at.as_millis(),
                    now.as_millis(),
                    o.deadline.as_millis()
                ),
            );
        }
    }
    broker_fifo(events, &mut out);
    out
}

/// How long the answer of a listener check may take (the transports' round-trip timeout).
const CHECK_ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Whether the link whose changes are `link` was down at `from` or went down before `to`.
fn down_between(link: &[(Duration, bool)], from: Duration, to: Duration) -> bool {
    let up_at_from = link
        .iter()
        .take_while(|(at, _)| *at <= from)
        .last()
        .is_some_and(|(_, up)| *up);
    !up_at_from || link.iter().any(|(at, up)| *at > from && *at <= to && !up)
}

/// `done-is-complete`: notes a message the controller received on a response subject, and
/// checks a `done` against the tokens received before it.
fn received(
    delivered: &mut BTreeMap<String, BTreeSet<u64>>,
    subject: &str,
    payload: &[u8],
    at: Duration,
    v: &mut impl FnMut(&'static str, Duration, String),
) {
    let Some(id) = subject.strip_prefix("response.") else {
        return;
    };
    match serde_json::from_slice::<StreamMessage>(payload) {
        Ok(StreamMessage::Token { index, .. }) => {
            delivered
                .entry(subject.to_owned())
                .or_default()
                .insert(index);
        }
        Ok(StreamMessage::Done { total_tokens, .. }) => {
            let got = delivered.get(subject);
            let missing: Vec<u64> = (0..total_tokens)
                .filter(|i| !got.is_some_and(|g| g.contains(i)))
                .take(5)
                .collect();
            if !missing.is_empty() {
                v(
                    "done-is-complete",
                    at,
                    format!(
                        "{id}: done with totalTokens {total_tokens}, but the controller never \
                         received token(s) {missing:?}"
                    ),
                );
            }
        }
        _ => {}
    }
}

/// `broker-fifo`: for each client whose link never dropped and which never restarted, the
/// broker received, on each subject, a prefix of its publishes there, in order.
fn broker_fifo(events: &[Event], out: &mut Vec<Violation>) {
    for node in ["worker", "controller"] {
        let lossy = events.iter().any(|e| {
            e.node == node
                && matches!(
                    e.kind,
                    EventKind::Disconnected | EventKind::Crashed | EventKind::PublishFailed { .. }
                )
        }) || events
            .iter()
            .filter(|e| e.node == node && e.kind == EventKind::Incarnation)
            .count()
            > 1;
        if lossy {
            continue;
        }
        // Per subject: a listener check is recorded by its sender only once answered, so the
        // order across subjects may differ from the broker's; within a subject it may not, but
        // the broker may already hold the subject's last message while its check's answer is
        // on the way (for at most the check's timeout).
        let now = events.last().map(|e| e.at).unwrap_or_default();
        let mut sent: BTreeMap<&str, Vec<&[u8]>> = BTreeMap::new();
        let mut got: BTreeMap<&str, Vec<&[u8]>> = BTreeMap::new();
        let mut last_got: BTreeMap<&str, Duration> = BTreeMap::new();
        for e in events {
            match &e.kind {
                EventKind::Published {
                    subject, payload, ..
                } if e.node == node => sent.entry(subject).or_default().push(payload),
                EventKind::BrokerGot {
                    from,
                    subject,
                    payload,
                    ..
                } if from == node => {
                    got.entry(subject).or_default().push(payload);
                    last_got.insert(subject, e.at);
                }
                _ => {}
            }
        }
        for (subject, got) in &got {
            let sent = sent.get(subject).map_or(&[][..], Vec::as_slice);
            let answer_on_the_way = got.len() == sent.len() + 1
                && got[..sent.len()] == sent[..]
                && last_got
                    .get(subject)
                    .is_some_and(|at| now.saturating_sub(*at) < CHECK_ANSWER_WITHIN);
            if answer_on_the_way {
                continue;
            }
            if got.len() > sent.len() || sent[..got.len()] != got[..] {
                let first = sent
                    .iter()
                    .zip(got)
                    .position(|(a, b)| a != b)
                    .unwrap_or(sent.len().min(got.len()));
                out.push(Violation {
                    invariant: "broker-fifo",
                    detail: format!(
                        "{node}: on {subject}, the broker's message {first} differs from what \
                         was published ({} published, {} received)",
                        sent.len(),
                        got.len()
                    ),
                });
            }
        }
    }
}

/// `queue-bound` for a flood: when `ids` were sent at once and outnumber what the worker may
/// run and queue, at least one of them must end `QUEUE_FULL`.
pub fn check_flood(events: &[Event], ids: &[String], room: usize) -> Option<Violation> {
    if ids.len() <= room {
        return None;
    }
    let full = events.iter().any(|e| match (&e.node[..], &e.kind) {
        (
            "worker",
            EventKind::Published {
                subject, payload, ..
            },
        ) => {
            subject
                .strip_prefix("response.")
                .is_some_and(|id| ids.iter().any(|i| i == id))
                && matches!(
                    serde_json::from_slice::<StreamMessage>(payload),
                    Ok(StreamMessage::Error { code, .. }) if code == "QUEUE_FULL"
                )
        }
        _ => false,
    });
    (!full).then(|| Violation {
        invariant: "queue-bound",
        detail: format!(
            "{} requests sent at once with room for {room}, and none ended QUEUE_FULL",
            ids.len()
        ),
    })
}

/// The messages the controller received on `response.{id}`, decoded, in order.
pub fn received_stream(events: &[Event], id: &str) -> Vec<StreamMessage> {
    let subject = format!("response.{id}");
    events
        .iter()
        .filter(|e| e.node == "controller")
        .filter_map(|e| match &e.kind {
            EventKind::Received {
                subject: s,
                payload,
            } if *s == subject => serde_json::from_slice(payload).ok(),
            _ => None,
        })
        .collect()
}
