//! [`Trace`]: the ordered record of everything observable in one simulated world.
//!
//! Every host of a world runs on the test's thread, one after the other, so appending to one
//! shared vector gives a total order that respects causality: an event recorded before another
//! really happened before it. The broker records every publish it receives, each
//! [`crate::SimTransport`] records what it hands to the broker and what it delivers to its
//! subscriptions, the worker host records its lifecycle, and the world records the faults it
//! injects. The invariants (`crate::invariants`) read it; the determinism tests hash it.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;

/// A fault a scenario injects; the sweep counts how often each fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// The worker's link to the broker is cut.
    Partition,
    /// The broker host crashes (and later restarts with no state).
    BrokerCrash,
    /// The engine crashes mid-stream and restarts.
    EngineCrash,
    /// A generation stops producing tokens.
    EngineHang,
    /// A model load fails.
    LoadFailure,
    /// A generation fails mid-stream.
    MidStreamFailure,
    /// The worker's wall clock is skewed, drifts or steps.
    ClockSkew,
    /// A client reads its messages slowly.
    SlowConsumer,
    /// A client subscribes to a response subject after sending the request.
    LateSubscriber,
    /// A request id is sent twice while the first is in flight.
    Duplicate,
    /// More requests arrive at once than the worker may run and queue.
    Flood,
    /// A request is cancelled (before it arrives, or while it runs).
    Cancel,
}

impl FaultKind {
    /// Every fault type.
    pub const ALL: [FaultKind; 12] = [
        FaultKind::Partition,
        FaultKind::BrokerCrash,
        FaultKind::EngineCrash,
        FaultKind::EngineHang,
        FaultKind::LoadFailure,
        FaultKind::MidStreamFailure,
        FaultKind::ClockSkew,
        FaultKind::SlowConsumer,
        FaultKind::LateSubscriber,
        FaultKind::Duplicate,
        FaultKind::Flood,
        FaultKind::Cancel,
    ];
}

/// What happened.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    /// A transport handed a message to its connection (or its disconnected buffer).
    Published {
        /// Subject.
        subject: String,
        /// Reply subject, if any.
        reply: Option<String>,
        /// Bytes.
        payload: Bytes,
    },
    /// A transport refused a publish (buffer full while disconnected).
    PublishFailed {
        /// Subject.
        subject: String,
    },
    /// A transport delivered a message to one of its subscriptions.
    Received {
        /// Subject.
        subject: String,
        /// Bytes.
        payload: Bytes,
    },
    /// The broker received a publish on connection `conn`.
    BrokerGot {
        /// The broker's connection id (unique across broker restarts).
        conn: u64,
        /// The name the client gave when it connected.
        from: String,
        /// Subject.
        subject: String,
        /// Bytes.
        payload: Bytes,
    },
    /// A transport's link came up.
    Connected {
        /// Reconnects so far.
        reconnects: u64,
    },
    /// A transport's link went down.
    Disconnected,
    /// The worker's lifecycle moved.
    Lifecycle {
        /// From.
        from: String,
        /// To.
        to: String,
    },
    /// The worker host started a new worker (first start, or after a crash or restart).
    Incarnation,
    /// The worker host crashed: its worker is gone without a drain.
    Crashed,
    /// A fault was injected.
    Fault(FaultKind),
}

/// One recorded event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Position in the trace.
    pub seq: u64,
    /// Simulated time since the world started.
    pub at: Duration,
    /// The host (or transport name) it happened on.
    pub node: String,
    /// What happened.
    pub kind: EventKind,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} {:>6}us {} ",
            self.seq,
            self.at.as_micros(),
            self.node
        )?;
        let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
        match &self.kind {
            EventKind::Published {
                subject,
                reply,
                payload,
            } => write!(f, "pub {subject} {reply:?} {}", text(payload)),
            EventKind::PublishFailed { subject } => write!(f, "pub-failed {subject}"),
            EventKind::Received { subject, payload } => {
                write!(f, "recv {subject} {}", text(payload))
            }
            EventKind::BrokerGot {
                conn,
                from,
                subject,
                payload,
            } => write!(f, "broker conn{conn} ({from}) {subject} {}", text(payload)),
            EventKind::Connected { reconnects } => write!(f, "connected ({reconnects})"),
            EventKind::Disconnected => f.write_str("disconnected"),
            EventKind::Lifecycle { from, to } => write!(f, "lifecycle {from} -> {to}"),
            EventKind::Incarnation => f.write_str("incarnation"),
            EventKind::Crashed => f.write_str("crashed"),
            EventKind::Fault(kind) => write!(f, "fault {kind:?}"),
        }
    }
}

#[derive(Default)]
struct Inner {
    events: Vec<Event>,
    next_conn: u64,
}

/// The shared trace of one world.
#[derive(Clone, Default)]
pub struct Trace {
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Trace({} events)", self.lock().events.len())
    }
}

impl Trace {
    /// An empty trace.
    pub fn new() -> Trace {
        Trace::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock is a bug in the simulator itself.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an event at the current simulated time (zero outside a host).
    pub fn record(&self, node: &str, kind: EventKind) {
        let at = turmoil::sim_elapsed().unwrap_or_default();
        self.record_at(at, node, kind);
    }

    /// Appends an event at `at`.
    pub fn record_at(&self, at: Duration, node: &str, kind: EventKind) {
        let mut inner = self.lock();
        let seq = inner.events.len() as u64;
        inner.events.push(Event {
            seq,
            at,
            node: node.to_owned(),
            kind,
        });
    }

    /// A connection id unique in this world.
    pub fn next_conn_id(&self) -> u64 {
        let mut inner = self.lock();
        inner.next_conn += 1;
        inner.next_conn
    }

    /// A copy of every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// Number of events so far.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A stable 64-bit hash (FNV-1a) of the whole trace's text, for determinism checks.
    pub fn hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for event in &self.lock().events {
            for b in event.to_string().bytes().chain([b'\n']) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    /// How many times each fault type fired.
    pub fn fault_counts(&self) -> std::collections::BTreeMap<FaultKind, u64> {
        let mut counts = std::collections::BTreeMap::new();
        for e in &self.lock().events {
            if let EventKind::Fault(kind) = e.kind {
                *counts.entry(kind).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The trace as text, one event a line (for failure reports).
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for e in &self.lock().events {
            out.push_str(&e.to_string());
            out.push('\n');
        }
        out
    }
}
