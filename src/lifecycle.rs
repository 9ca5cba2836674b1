//! The worker's lifecycle: `idle → connecting → registering → ready → draining → stopped`,
//! with `ready → connecting` when the link is lost and `stopped → connecting` on a restart.
//!
//! The state lives in a watch channel so tests, the health endpoint and the logs can follow
//! it. Transitions go through [`LifecycleCell::advance`], which refuses any move the table
//! does not allow, so no task can put the worker in an impossible state.

use std::fmt;

use tokio::sync::watch;
use tracing::info;

/// A lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lifecycle {
    /// Built, not started.
    Idle,
    /// Waiting for the message server.
    Connecting,
    /// Connected; announcing itself.
    Registering,
    /// Registered and taking requests.
    Ready,
    /// Stopping: no new work, finishing what was accepted.
    Draining,
    /// Stopped; may be started again.
    Stopped,
}

impl Lifecycle {
    /// Whether the table allows moving from `self` to `next`.
    pub fn can_become(self, next: Lifecycle) -> bool {
        use Lifecycle::*;
        matches!(
            (self, next),
            (Idle | Stopped, Connecting)
                | (Connecting, Registering)
                | (Registering, Ready)
                | (Registering | Ready, Connecting)
                | (Connecting | Registering | Ready, Draining)
                | (Draining, Stopped)
        )
    }

    /// The state's name, as the existing worker spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Idle => "idle",
            Lifecycle::Connecting => "connecting",
            Lifecycle::Registering => "registering",
            Lifecycle::Ready => "ready",
            Lifecycle::Draining => "draining",
            Lifecycle::Stopped => "stopped",
        }
    }
}

impl fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The current state, shared by the worker's tasks.
#[derive(Debug)]
pub struct LifecycleCell {
    tx: watch::Sender<Lifecycle>,
}

impl Default for LifecycleCell {
    fn default() -> Self {
        LifecycleCell {
            tx: watch::Sender::new(Lifecycle::Idle),
        }
    }
}

impl LifecycleCell {
    /// Moves to `next` if the table allows it from the current state; returns whether it moved.
    /// A refused move is how racing tasks lose (a link loss seen while draining stays draining).
    pub fn advance(&self, next: Lifecycle) -> bool {
        let mut from = Lifecycle::Idle;
        let moved = self.tx.send_if_modified(|state| {
            from = *state;
            if state.can_become(next) {
                *state = next;
                true
            } else {
                false
            }
        });
        if moved {
            info!(from = %from, to = %next, "lifecycle");
        }
        moved
    }

    /// The current state.
    pub fn get(&self) -> Lifecycle {
        *self.tx.borrow()
    }

    /// Follows the state.
    pub fn subscribe(&self) -> watch::Receiver<Lifecycle> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::Lifecycle::*;
    use super::*;

    #[test]
    fn only_the_documented_transitions_are_allowed() {
        let all = [Idle, Connecting, Registering, Ready, Draining, Stopped];
        let allowed: Vec<(Lifecycle, Lifecycle)> = all
            .iter()
            .flat_map(|&a| all.iter().map(move |&b| (a, b)))
            .filter(|(a, b)| a.can_become(*b))
            .collect();
        let expected = [
            (Idle, Connecting),
            (Connecting, Registering),
            (Connecting, Draining),
            (Registering, Connecting),
            (Registering, Ready),
            (Registering, Draining),
            (Ready, Connecting),
            (Ready, Draining),
            (Draining, Stopped),
            (Stopped, Connecting),
        ];
        assert_eq!(allowed, expected);
    }

    #[test]
    fn a_refused_move_leaves_the_state_alone() {
        let cell = LifecycleCell::default();
        assert!(!cell.advance(Ready));
        assert_eq!(cell.get(), Idle);
        assert!(cell.advance(Connecting));
        assert!(cell.advance(Draining));
        assert!(!cell.advance(Connecting));
        assert_eq!(cell.get(), Draining);
    }
}
