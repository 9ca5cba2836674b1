//! [`Phase`]: where a run's loop is (serving, then draining) and the drain's two timers.

use tokio::time::Instant;

use crate::limits::GROUP_QUIET;

/// Where the run loop is.
#[derive(Clone, Copy, Debug)]
pub(super) enum Phase {
    /// Taking requests.
    Serving,
    /// Refusing new requests on the worker's own subject while accepted ones finish.
    Draining {
        /// When what is left ends with `WORKER_SHUTDOWN`.
        deadline: Instant,
        /// When the model groups will have been quiet long enough to leave them.
        group_quiet_at: Instant,
    },
}

impl Phase {
    pub(super) fn is_draining(self) -> bool {
        matches!(self, Phase::Draining { .. })
    }

    /// Whether a drain may end: nothing accepted is left and the model groups are quiet.
    pub(super) fn may_leave(self, idle: bool, no_groups: bool, now: Instant) -> bool {
        match self {
            Phase::Serving => false,
            Phase::Draining { group_quiet_at, .. } => idle && (no_groups || now >= group_quiet_at),
        }
    }

    /// The drain deadline and the end of the groups' quiet time, while draining.
    pub(super) fn timers(self) -> (Option<Instant>, Option<Instant>) {
        match self {
            Phase::Serving => (None, None),
            Phase::Draining {
                deadline,
                group_quiet_at,
            } => (Some(deadline), Some(group_quiet_at)),
        }
    }

    /// A model group just routed a request here: while draining, the quiet time starts again.
    pub(super) fn group_active(&mut self, now: Instant) {
        if let Phase::Draining { group_quiet_at, .. } = self {
            *group_quiet_at = now + GROUP_QUIET;
        }
    }
}
