//! One generation's tokens on their way from the engine to the worker: [`token_channel`] makes
//! the two ends, the engine's [`TokenSender`] and the worker's [`TokenStream`].
//!
//! The sender hands a token over at once while the channel has room. Once the consumer has
//! fallen behind (the channel is full), it holds the tokens back, and they reach the consumer
//! together, in one [`TokenEvent::Tokens`], as soon as it has taken everything before them,
//! or with the next token if the channel has room by then: a slow consumer gets fewer, larger
//! events instead of making the engine wait. At most [`TOKENS_HELD_MAX`] tokens are held (plus
//! the ones of the call that reached the bound); past it the sender waits for the consumer,
//! which is the back-pressure. The last event (`Finished` or `Failed`) follows everything
//! held, never waits, and closes the stream to the sender. Dropping the [`TokenStream`]
//! cancels the generation: the sender's calls fail with [`StreamClosed`] from then on, and
//! [`TokenSender::closed`] returns.
//!
//! This module owns the hand-over, not what the tokens are: engines decide when to send them,
//! the worker what to do with them.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::sync::mpsc::{self, error::TryRecvError, error::TrySendError};

use super::TokenEvent;
use crate::limits::TOKENS_HELD_MAX;

/// Makes the two ends of one generation's tokens; the channel holds `capacity` events (at
/// least one).
pub fn token_channel(capacity: usize) -> (TokenSender, TokenStream) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let shared = Arc::new(Shared {
        held: Mutex::new(Held::default()),
        room: Notify::new(),
    });
    (
        TokenSender {
            tx,
            shared: shared.clone(),
        },
        TokenStream { rx, shared },
    )
}

/// The generation no longer takes tokens: its consumer is gone, or its last event was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the token stream is closed")]
pub struct StreamClosed;

/// What both ends see.
struct Shared {
    held: Mutex<Held>,
    /// Signalled when the consumer takes the held tokens.
    room: Notify,
}

/// What the sender holds back while the channel is full.
#[derive(Default)]
struct Held {
    /// Tokens not yet in the channel, in order; they follow everything in it.
    tokens: Vec<String>,
    /// The last event, when it could not go into the channel at once; it follows `tokens`.
    last: Option<TokenEvent>,
    /// Whether the last event was given: nothing may follow it.
    ended: bool,
}

/// Every critical section here is a plain move of values that cannot panic half-way, so a
/// poisoned lock still holds valid data.
fn lock(shared: &Shared) -> MutexGuard<'_, Held> {
    shared.held.lock().unwrap_or_else(|p| p.into_inner())
}

/// The engine's end of a generation. Clones send into the same stream.
#[derive(Clone)]
pub struct TokenSender {
    tx: mpsc::Sender<TokenEvent>,
    shared: Arc<Shared>,
}

impl TokenSender {
    /// Sends one token's text (possibly empty, half of a multi-byte character).
    pub async fn send(&self, token: String) -> Result<(), StreamClosed> {
        self.send_all(vec![token]).await
    }

    /// Sends several tokens in order, in one event when the channel has room. Waits only while
    /// [`TOKENS_HELD_MAX`] tokens are held back already; fails once the consumer is gone or the
    /// last event was sent.
    pub async fn send_all(&self, tokens: Vec<String>) -> Result<(), StreamClosed> {
        let mut tokens = Some(tokens);
        loop {
            if self.hand_over(&mut tokens)? {
                return Ok(());
            }
            // At the bound: registered, then checked again, so that a take between the check
            // and the wait still wakes this sender.
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.hand_over(&mut tokens)? {
                return Ok(());
            }
            tokio::select! {
                () = room => {}
                () = self.tx.closed() => return Err(StreamClosed),
            }
        }
    }

    /// Puts `tokens` into the channel, or among the held ones; `false` (and `tokens` left as
    /// they are) when too many are held already.
    fn hand_over(&self, tokens: &mut Option<Vec<String>>) -> Result<bool, StreamClosed> {
        let mut held = lock(&self.shared);
        if held.ended || self.tx.is_closed() {
            return Err(StreamClosed);
        }
        if held.tokens.len() >= TOKENS_HELD_MAX {
            return Ok(false);
        }
        let Some(mut batch) = tokens.take().filter(|t| !t.is_empty()) else {
            return Ok(true);
        };
        // Under the lock only the consumer changes the channel, and only by making room.
        if !held.tokens.is_empty() {
            if self.tx.capacity() == 0 {
                held.tokens.append(&mut batch);
                return Ok(true);
            }
            // What is held goes first, with these, now that there is room.
            let mut all = std::mem::take(&mut held.tokens);
            all.append(&mut batch);
            batch = all;
        }
        match self.tx.try_send(TokenEvent::Tokens(batch)) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(event)) => {
                if let TokenEvent::Tokens(batch) = event {
                    held.tokens = batch;
                }
                Ok(true)
            }
            Err(TrySendError::Closed(_)) => Err(StreamClosed),
        }
    }

    /// Sends the generation's last event, `Finished` or `Failed`, after every token given
    /// before; never waits. Only the first last event counts; nothing is sent after it.
    ///
    /// # Panics
    ///
    /// On a `Tokens` event: tokens go through [`TokenSender::send`].
    pub fn end(&self, last: TokenEvent) {
        assert!(
            !matches!(last, TokenEvent::Tokens(_)),
            "a stream's last event is Finished or Failed"
        );
        let mut held = lock(&self.shared);
        if held.ended {
            return;
        }
        held.ended = true;
        if !held.tokens.is_empty() {
            held.last = Some(last);
            return;
        }
        if let Err(TrySendError::Full(last)) = self.tx.try_send(last) {
            held.last = Some(last);
        }
    }

    /// Waits until the consumer is gone (the [`TokenStream`] was dropped).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Whether the stream takes no more tokens: its consumer is gone or it has ended.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed() || lock(&self.shared).ended
    }
}

/// The worker's end of a generation: its events in order, tokens first, then exactly one
/// `Finished` or `Failed`. Dropping it cancels the generation.
pub struct TokenStream {
    rx: mpsc::Receiver<TokenEvent>,
    shared: Arc<Shared>,
}

impl TokenStream {
    /// The next event; `None` once the engine has dropped its end and everything was taken.
    ///
    /// Cancellation-safe: an event is either returned or left in the stream.
    pub async fn recv(&mut self) -> Option<TokenEvent> {
        loop {
            if let Some(next) = self.ready() {
                return next;
            }
            match self.rx.recv().await {
                Some(event) => return Some(event),
                // The senders are gone: what they held is still to be taken.
                None => continue,
            }
        }
    }

    /// The next event without waiting: [`TryRecvError::Empty`] when none is ready yet,
    /// [`TryRecvError::Disconnected`] once the engine has dropped its end and everything was
    /// taken.
    pub fn try_recv(&mut self) -> Result<TokenEvent, TryRecvError> {
        match self.ready() {
            Some(Some(event)) => Ok(event),
            Some(None) => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// The next event if one is ready: the channel's first, else what the sender held back;
    /// `Some(None)` when the senders are gone and nothing is left, `None` when nothing is
    /// ready yet.
    fn ready(&mut self) -> Option<Option<TokenEvent>> {
        // Under the lock, so that everything a sender put in the channel before it held
        // tokens back is seen before them.
        let mut held = lock(&self.shared);
        let disconnected = match self.rx.try_recv() {
            Ok(event) => return Some(Some(event)),
            Err(TryRecvError::Empty) => false,
            Err(TryRecvError::Disconnected) => true,
        };
        if !held.tokens.is_empty() {
            let tokens = std::mem::take(&mut held.tokens);
            drop(held);
            self.shared.room.notify_waiters();
            return Some(Some(TokenEvent::Tokens(tokens)));
        }
        if let Some(last) = held.last.take() {
            return Some(Some(last));
        }
        disconnected.then_some(None)
    }
}

impl std::fmt::Debug for TokenStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenStream")
    }
}

impl std::fmt::Debug for TokenSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSender")
    }
}

#[cfg(test)]
mod tests;
