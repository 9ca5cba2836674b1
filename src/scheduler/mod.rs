//! Admission and ordering of accepted requests: a global in-flight limit, per-tier concurrency
//! and queue bounds, a per-model concurrency bound (the engine's capacity, which may fall when
//! a load says the model runs fewer at once), and three priorities, FIFO within a priority.
//!
//! Sans-IO: the scheduler holds request ids and counts, and answers decisions; the dispatcher
//! starts and finishes the work. A tier's requests wait in one lane per model, so a model at
//! its bound holds up its own requests only; the next request to start is the highest-priority,
//! oldest one among the lanes that may start. Invariant, checked after every operation in debug
//! builds: no queued request could start (so a free slot is never left idle while work waits).

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

/// Requests of one model in hand: running, and waiting in the worker's queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelCount {
    /// Started: handed to a request task, which loads the model and generates.
    pub running: usize,
    /// Waiting for a slot.
    pub queued: usize,
}

/// One model's requests within its tier: how many run, and those waiting.
#[derive(Debug, Default)]
struct Lane {
    running: usize,
    /// Of those running, how many started before the model's limit fell below them; each
    /// finish takes one off first, so no request starts while the model is at or past its
    /// limit.
    over: usize,
    /// One FIFO per priority, highest first; entries are (arrival number, request id).
    queues: [VecDeque<(u64, String)>; 3],
}

impl Lane {
    fn queued(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    fn is_idle(&self) -> bool {
        self.running == 0 && self.queued() == 0
    }
}

#[derive(Debug, Default)]
struct TierState {
    running: usize,
    /// The lanes of the models with requests running or waiting; idle lanes are dropped.
    lanes: BTreeMap<String, Lane>,
}

impl TierState {
    fn queued(&self) -> usize {
        self.lanes.values().map(Lane::queued).sum()
    }

    /// The lane of `model`, made when it has none (allocating its key only then).
    fn lane(&mut self, model: &str) -> &mut Lane {
        if !self.lanes.contains_key(model) {
            self.lanes.insert(model.to_owned(), Lane::default());
        }
        self.lanes
            .get_mut(model)
            .expect("the lane was just made if it was missing")
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

    /// The requests in hand of every model that has some, by model id: at most one entry per
    /// request running or waiting, since idle lanes are dropped.
    pub fn by_model(&self) -> BTreeMap<String, ModelCount> {
        let mut counts: BTreeMap<String, ModelCount> = BTreeMap::new();
        for (model, lane) in self.tiers.values().flat_map(|state| &state.lanes) {
            let count = counts.entry(model.clone()).or_default();
            count.running += lane.running;
            count.queued += lane.queued();
        }
        counts
    }

    /// Lowers the requests of `model` that may run at once to `max` (at least 1), when that is
    /// below its limit; whether it fell. Requests of the model running past the new limit go
    /// on, and none of it starts until fewer than `max` run.
    pub fn lower_model_limit(&mut self, model: &str, max: usize) -> bool {
        let max = max.max(1);
        if max >= self.model_max(model) {
            return false;
        }
        self.limits.models.insert(model.to_owned(), max);
        for state in self.tiers.values_mut() {
            if let Some(lane) = state.lanes.get_mut(model) {
                lane.over = lane.running.saturating_sub(max);
            }
        }
        self.check();
        true
    }

    /// Requests of `model` that may run at once.
    fn model_max(&self, model: &str) -> usize {
        self.limits.models.get(model).copied().unwrap_or(usize::MAX)
    }

    /// How many more requests of `model`, of `tier`, could start now: the least room of the
    /// in-flight limit, the tier's and the model's.
    pub fn free_slots(&self, tier: ModelTier, model: &str) -> usize {
        let (Some(limit), Some(state)) = (self.limits.tiers.get(&tier), self.tiers.get(&tier))
        else {
            return 0;
        };
        let model_running = state.lanes.get(model).map_or(0, |lane| lane.running);
        (self.limits.inflight_max.saturating_sub(self.running))
            .min(limit.max_concurrent.saturating_sub(state.running))
            .min(self.model_max(model).saturating_sub(model_running))
    }

    fn can_start(&self, tier: ModelTier, model: &str) -> bool {
        let (Some(limit), Some(state)) = (self.limits.tiers.get(&tier), self.tiers.get(&tier))
        else {
            return false;
        };
        let model_running = state.lanes.get(model).map_or(0, |lane| lane.running);
        self.running < self.limits.inflight_max
            && state.running < limit.max_concurrent
            && model_running < self.model_max(model)
    }

    /// Admits a new request of `model`, of `tier`.
    pub fn admit(
        &mut self,
        id: String,
        tier: ModelTier,
        model: &str,
        priority: Priority,
    ) -> Admission {
        let decision = if self.can_start(tier, model) {
            self.start(tier, model);
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
                    state.lane(model).queues[priority_slot(priority)].push_back((arrival, id));
                    self.queued += 1;
                }
                Admission::Queued
            }
        };
        self.check();
        decision
    }

    fn start(&mut self, tier: ModelTier, model: &str) {
        if let Some(state) = self.tiers.get_mut(&tier) {
            state.running += 1;
            state.lane(model).running += 1;
            self.running += 1;
        }
    }

    /// A running request of `model`, of `tier`, finished; returns the waiting requests that
    /// start now, highest priority first, oldest first within a priority.
    pub fn finish(&mut self, tier: ModelTier, model: &str) -> Vec<String> {
        let state = self.tiers.get_mut(&tier);
        let lane = state.and_then(|s| {
            let lane = s.lanes.get_mut(model).filter(|lane| lane.running > 0)?;
            lane.running -= 1;
            lane.over = lane.over.saturating_sub(1);
            s.running -= 1;
            Some(())
        });
        assert!(lane.is_some(), "finish of a model with nothing running");
        self.running -= 1;
        let mut started = Vec::new();
        while let Some((tier, model, slot)) = self.next_startable() {
            let next = self
                .tiers
                .get_mut(&tier)
                .and_then(|s| s.lanes.get_mut(&model))
                .and_then(|lane| lane.queues[slot].pop_front());
            if let Some((_, id)) = next {
                self.queued -= 1;
                self.start(tier, &model);
                started.push(id);
            }
        }
        self.drop_idle_lanes();
        self.check();
        started
    }

    /// The (tier, model, priority slot) whose head should start next, if any can.
    fn next_startable(&self) -> Option<(ModelTier, String, usize)> {
        self.tiers
            .iter()
            .flat_map(|(tier, state)| {
                state
                    .lanes
                    .iter()
                    .filter(|(model, _)| self.can_start(*tier, model))
                    .flat_map(move |(model, lane)| {
                        lane.queues.iter().enumerate().filter_map(move |(slot, q)| {
                            q.front().map(|(arrival, _)| (slot, *arrival, *tier, model))
                        })
                    })
            })
            .min()
            .map(|(slot, _, tier, model)| (tier, model.clone(), slot))
    }

    /// Removes a waiting request (cancelled or timed out); false when it was not waiting.
    pub fn remove_queued(&mut self, id: &str) -> bool {
        let removed = self.tiers.values_mut().any(|state| {
            state.lanes.values_mut().any(|lane| {
                lane.queues.iter_mut().any(|queue| {
                    let found = queue.iter().position(|(_, queued)| queued == id);
                    found.map(|pos| queue.remove(pos)).is_some()
                })
            })
        });
        if removed {
            self.queued -= 1;
            self.drop_idle_lanes();
            self.check();
        }
        removed
    }

    /// Removes every waiting request, in the order they would have started.
    pub fn take_queued(&mut self) -> Vec<String> {
        let mut all: Vec<(usize, u64, String)> = Vec::with_capacity(self.queued);
        for state in self.tiers.values_mut() {
            for lane in state.lanes.values_mut() {
                for (slot, queue) in lane.queues.iter_mut().enumerate() {
                    all.extend(queue.drain(..).map(|(arrival, id)| (slot, arrival, id)));
                }
            }
        }
        self.queued = 0;
        self.drop_idle_lanes();
        all.sort_unstable();
        all.into_iter().map(|(_, _, id)| id).collect()
    }

    /// Forgets the lanes of models with nothing running or waiting, so the lanes are bounded
    /// by the requests in hand.
    fn drop_idle_lanes(&mut self) {
        for state in self.tiers.values_mut() {
            state.lanes.retain(|_, lane| !lane.is_idle());
        }
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
        debug_assert!(
            self.tiers
                .values()
                .all(|s| { s.running == s.lanes.values().map(|lane| lane.running).sum::<usize>() })
        );
        debug_assert!(self.running <= self.limits.inflight_max);
        debug_assert!(self.queued <= self.limits.queue_depth_max);
        debug_assert!(self.tiers.values().all(|s| {
            s.lanes.iter().all(|(model, lane)| {
                lane.over <= lane.running
                    && lane.running <= self.model_max(model).saturating_add(lane.over)
            })
        }));
        debug_assert!(
            self.next_startable().is_none(),
            "a waiting request could start"
        );
    }
}
