//! Planted bugs, for proving that the simulation suite's invariants catch real mistakes.
//!
//! With the `mutation` feature (enabled only by the `sim` crate), a worker built with
//! `Worker::with_mutations` misbehaves in the chosen ways. Without the feature, [`Mutations`]
//! is always empty and every check below compiles to `false`. A release build never has it.

/// One planted bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// After a reconnect, become ready without registering again.
    SkipReregistration,
    /// A request that times out ends without its terminal message.
    DropTerminalOnTimeout,
    /// A cancel for a request that has not arrived yet is forgotten.
    ForgetLatchedCancel,
    /// Stop aborts accepted requests at once instead of letting them finish.
    DrainWithoutWaiting,
    /// A token is published after the `done` message.
    TokenAfterDone,
    /// The queue bound is not enforced.
    IgnoreQueueBound,
    /// A stream's first message goes out without waiting for the link, and a stream whose first
    /// publish timed out is abandoned without a terminal (the loss a long broker outage caused).
    AbandonOnFirstPublishTimeout,
    /// The engine's capacity per model is not enforced: a model's requests run up to their
    /// tier's and the worker's limits, past what the engine runs.
    IgnoreEngineCapacity,
    /// The tokens handed to the transport together all carry the index of the first of them.
    OneIndexPerBatch,
}

impl Mutation {
    /// Every planted bug.
    pub const ALL: [Mutation; 9] = [
        Mutation::SkipReregistration,
        Mutation::DropTerminalOnTimeout,
        Mutation::ForgetLatchedCancel,
        Mutation::DrainWithoutWaiting,
        Mutation::TokenAfterDone,
        Mutation::IgnoreQueueBound,
        Mutation::AbandonOnFirstPublishTimeout,
        Mutation::IgnoreEngineCapacity,
        Mutation::OneIndexPerBatch,
    ];

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// A set of planted bugs; empty unless the `mutation` feature is on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mutations {
    bits: u32,
}

impl Mutations {
    /// No planted bug.
    pub const NONE: Mutations = Mutations { bits: 0 };

    /// This set plus `m`.
    #[cfg(feature = "mutation")]
    pub fn with(self, m: Mutation) -> Mutations {
        Mutations {
            bits: self.bits | m.bit(),
        }
    }

    /// Whether `m` is planted.
    #[inline]
    pub fn has(self, m: Mutation) -> bool {
        cfg!(feature = "mutation") && self.bits & m.bit() != 0
    }
}
