//! [`Broker`]: a small NATS-like broker that runs as a turmoil host.
//!
//! Clients reach it over turmoil's simulated TCP with the framed protocol of [`crate::wire`].
//! It routes publishes to every matching subscription (`*` and `>` wildcards), to one member
//! per queue group (round robin, in subscription order), writes each connection's messages
//! through one FIFO queue, answers a publish that has a reply subject and no subscriber with a
//! 503 "no responders" status on the reply subject, answers pings, and drops a connection it
//! has not heard from within `dead_after` (a client pings more often than that). It keeps no
//! state across a crash: a restarted broker knows no subscriptions until clients resubscribe.
//! Every publish it receives is recorded in the world's [`Trace`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use turmoil::net::{TcpListener, TcpStream};

use crate::trace::{EventKind, Trace};
use crate::wire::{Frame, NO_RESPONDERS, matches, read_frame, write_frames};

/// Port the broker listens on.
pub const BROKER_PORT: u16 = 4222;

/// How the broker behaves.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// A connection silent for this long is closed.
    pub dead_after: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            dead_after: Duration::from_millis(600),
        }
    }
}

struct Sub {
    subject: String,
    queue: Option<String>,
}

#[derive(Default)]
struct State {
    /// Outbound queue of each connection.
    conns: BTreeMap<u64, mpsc::UnboundedSender<Frame>>,
    /// Subscriptions by (connection, sid), so iteration order is deterministic.
    subs: BTreeMap<(u64, u64), Sub>,
    /// Round-robin position per (subject pattern, queue group).
    round_robin: BTreeMap<(String, String), u64>,
}

/// The broker of one world.
#[derive(Clone)]
pub struct Broker {
    config: BrokerConfig,
    trace: Trace,
    state: Arc<Mutex<State>>,
}

impl Broker {
    /// A broker recording into `trace`. Build a fresh one per host start.
    pub fn new(config: BrokerConfig, trace: Trace) -> Broker {
        Broker {
            config,
            trace,
            state: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves until the host is crashed.
    pub async fn serve(self) -> turmoil::Result {
        let listener = TcpListener::bind(("0.0.0.0", BROKER_PORT)).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let id = self.trace.next_conn_id();
            tokio::spawn(self.clone().connection(id, stream));
        }
    }

    async fn connection(self, id: u64, stream: TcpStream) {
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
        self.lock().conns.insert(id, tx.clone());
        let writer = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                if write_frames(&mut wr, &batch).await.is_err() {
                    return;
                }
            }
        });
        let mut node = format!("conn{id}");
        loop {
            let frame =
                match tokio::time::timeout(self.config.dead_after, read_frame(&mut rd)).await {
                    Ok(Ok(frame)) => frame,
                    _ => break,
                };
            match frame {
                Frame::Connect { name } => node = name,
                Frame::Sub {
                    sid,
                    subject,
                    queue,
                } => {
                    self.lock().subs.insert((id, sid), Sub { subject, queue });
                }
                Frame::Unsub { sid } => {
                    self.lock().subs.remove(&(id, sid));
                }
                Frame::Pub {
                    subject,
                    reply,
                    payload,
                } => {
                    let delivered = self.route(&subject, reply, payload.clone(), None);
                    // A publish answered "no responders" reached nobody: it is not recorded,
                    // as its sender (a listener check) does not record it either.
                    if !subject.starts_with("_INBOX.") && delivered {
                        self.trace.record(
                            "broker",
                            EventKind::BrokerGot {
                                conn: id,
                                from: node.clone(),
                                subject: subject.clone(),
                                payload: Bytes::from(payload.clone()),
                            },
                        );
                    }
                }
                Frame::Ping { id: ping } => {
                    let _ = tx.send(Frame::Pong { id: ping });
                }
                Frame::Pong { .. } | Frame::Msg { .. } => {}
            }
        }
        writer.abort();
        let mut state = self.lock();
        state.conns.remove(&id);
        state.subs.retain(|(conn, _), _| *conn != id);
    }

    /// Delivers a publish; a publish with a reply subject and no subscriber gets a 503 there.
    /// Returns false only for a publish answered with "no responders".
    fn route(
        &self,
        subject: &str,
        reply: Option<String>,
        payload: Vec<u8>,
        status: Option<u16>,
    ) -> bool {
        let mut state = self.lock();
        let mut targets: Vec<(u64, u64)> = Vec::new();
        let mut groups: BTreeMap<(String, String), Vec<(u64, u64)>> = BTreeMap::new();
        for (&key, sub) in &state.subs {
            if !matches(&sub.subject, subject) {
                continue;
            }
            match &sub.queue {
                None => targets.push(key),
                Some(q) => groups
                    .entry((sub.subject.clone(), q.clone()))
                    .or_default()
                    .push(key),
            }
        }
        for (group, members) in groups {
            let n = state.round_robin.entry(group).or_insert(0);
            let pick = members[(*n as usize) % members.len()];
            *n += 1;
            targets.push(pick);
        }
        if targets.is_empty() {
            drop(state);
            if let (Some(reply), None) = (reply, status) {
                self.route(&reply, None, Vec::new(), Some(NO_RESPONDERS));
                return false;
            }
            return true;
        }
        targets.sort_unstable();
        for (conn, sid) in targets {
            if let Some(tx) = state.conns.get(&conn) {
                let _ = tx.send(Frame::Msg {
                    sid,
                    subject: subject.to_owned(),
                    reply: reply.clone(),
                    payload: payload.clone(),
                    status,
                });
            }
        }
        true
    }
}
