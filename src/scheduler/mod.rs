//! Admission and ordering of accepted requests: a global in-flight limit, per-tier concurrency
//! and queue bounds, and three priorities, FIFO within a priority.
//!
//! Sans-IO: the scheduler holds request ids and counts, and answers decisions; the dispatcher
//! starts and finishes the work. Invariant, checked after every operation in debug builds: no
//! queued request could start (so a free slot is never left idle while work waits).

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};

use crate::plan::{ModelTier, SchedulerLimits};
use crate::protocol::Priority;

/// The scheduler's answer to a new request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Start it now.
    Start,
    /// It waits; it will come out of [`Scheduler::finish`].
    Queued,
    /// No room to wait: answer `QUEUE_FULL`.
    Full {
        /// Requests waiting in the bound that was hit.
        waiting: usize,
        /// That bound.
        limit: usize,
    },
}

#[derive(Debug, Default)]
struct TierState {
    running: usize,
    /// One FIFO per priority, highest first; entries are (arrival number, request id).
    queues: [VecDeque<(u64, String)>; 3],
}

impl TierState {
    fn queued(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }
}

/// Decides which requests run and which wait.
#[derive(Debug)]
pub struct Scheduler {
    limits: SchedulerLimits,
    tiers: BTreeMap<ModelTier, TierState>,
    running: usize,
    queued: usize,
    arrivals: u64,
}

fn priority_slot(priority: Priority) -> usize {
    match priority {
        Priority::High => 0,
        Priority::Medium => 1,
        Priority::Low => 2,
    }
}

impl Scheduler {
    /// An idle scheduler.
    pub fn new(limits: SchedulerLimits) -> Scheduler {
        assert!(
            limits.inflight_max > 0,
            "a worker runs at least one request"
        );
        Scheduler {
            tiers: limits
                .tiers
                .keys()
                .map(|&t| (t, TierState::default()))
                .collect(),
            limits,
            running: 0,
            queued: 0,
            arrivals: 0,
        }
    }

    /// The bounds.
    pub fn limits(&self) -> &SchedulerLimits {
        &self.limits
    }

    /// Requests running.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Requests waiting.
    pub fn queued(&self) -> usize {
        self.queued
    }

    fn can_start(&self, tier: ModelTier) -> bool {
        let (Some(limit), Some(state)) = (self.limits.tiers.get(&tier), self.tiers.get(&tier))
        else {
            return false;
        };
        self.running < self.limits.inflight_max && state.running < limit.max_concurrent
    }

    /// Admits a new request of `tier`.
    pub fn admit(&mut self, id: String, tier: ModelTier, priority: Priority) -> Admission {
        let decision = if self.can_start(tier) {
            self.start(tier);
            Admission::Start
        } else {
            let tier_limit = self.limits.tiers.get(&tier).map_or(0, |l| l.queue_depth);
            let tier_waiting = self.tiers.get(&tier).map_or(0, TierState::queued);
            if self.queued >= self.limits.queue_depth_max {
                Admission::Full {
                    waiting: self.queued,
                    limit: self.limits.queue_depth_max,
                }
            } else if tier_waiting >= tier_limit {
                Admission::Full {
                    waiting: tier_waiting,
                    limit: tier_limit,
                }
            } else {
                self.arrivals += 1;
                let arrival = self.arrivals;
                if let Some(state) = self.tiers.get_mut(&tier) {
                    state.queues[priority_slot(priority)].push_back((arrival, id));
                    self.queued += 1;
                }
                Admission::Queued
            }
        };
        self.check();
        decision
    }

    fn start(&mut self, tier: ModelTier) {
        if let Some(state) = self.tiers.get_mut(&tier) {
            state.running += 1;
            self.running += 1;
        }
    }

    /// A running request of `tier` finished; returns the waiting requests that start now,
    /// highest priority first, oldest first within a priority.
    pub fn finish(&mut self, tier: ModelTier) -> Vec<String> {
        let state = self.tiers.get_mut(&tier);
        assert!(
            state.as_ref().is_some_and(|s| s.running > 0),
            "finish of a tier with nothing running"
        );
        if let Some(state) = state {
            state.running -= 1;
            self.running -= 1;
        }
        let mut started = Vec::new();
        while let Some((tier, slot)) = self.next_startable() {
            if let Some((_, id)) = self
                .tiers
                .get_mut(&tier)
                .and_then(|s| s.queues[slot].pop_front())
            {
                self.queued -= 1;
                self.start(tier);
                started.push(id);
            }
        }
        self.check();
        started
    }

    /// The (tier, priority slot) whose head should start next, if any can.
    fn next_startable(&self) -> Option<(ModelTier, usize)> {
        self.tiers
            .iter()
            .filter(|(tier, _)| self.can_start(**tier))
            .flat_map(|(tier, state)| {
                state
                    .queues
                    .iter()
                    .enumerate()
                    .filter_map(move |(slot, q)| {
                        q.front().map(|(arrival, _)| (slot, *arrival, *tier))
                    })
            })
            .min()
            .map(|(slot, _, tier)| (tier, slot))
    }

    /// Removes a waiting request (cancelled or timed out); false when it was not waiting.
    pub fn remove_queued(&mut self, id: &str) -> bool {
        for state in self.tiers.values_mut() {
            for queue in &mut state.queues {
                if let Some(pos) = queue.iter().position(|(_, queued)| queued == id) {
                    queue.remove(pos);
                    self.queued -= 1;
                    self.check();
                    return true;
                }
            }
        }
        false
    }

    /// Removes every waiting request, in the order they would have started.
    pub fn take_queued(&mut self) -> Vec<String> {
        let mut all: Vec<(usize, u64, String)> = Vec::with_capacity(self.queued);
        for state in self.tiers.values_mut() {
            for (slot, queue) in state.queues.iter_mut().enumerate() {
                all.extend(queue.drain(..).map(|(arrival, id)| (slot, arrival, id)));
            }
        }
        self.queued = 0;
        all.sort_unstable();
        all.into_iter().map(|(_, _, id)| id).collect()
    }

    fn check(&self) {
        debug_assert_eq!(
            self.queued,
            self.tiers.values().map(TierState::queued).sum::<usize>()
        );
        debug_assert_eq!(
            self.running,
            self.tiers.values().map(|s| s.running).sum::<usize>()
        );
        debug_assert!(self.running <= self.limits.inflight_max);
        debug_assert!(self.queued <= self.limits.queue_depth_max);
        debug_assert!(
            self.next_startable().is_none(),
            "a waiting request could start"
        );
    }
}
