//! Concurrency planning from a [`HostProfile`]: how many requests of each model tier the host
//! should run and queue, how far to trust that, and which tiers it can serve at all — the
//! TypeScript detector's `recommendConcurrency` and `hardware-reporter.ts`,
//! plus configuration overrides — and the batch size the engine is asked for a model of each
//! tier ([`BatchSizes`]). Pure; the probes supply the profile.

use std::collections::BTreeMap;

use super::{ModelTier, TierLimit};
use crate::hardware::{ChipVariant, HostProfile};
use crate::limits::RUNTIME_BATCH_SIZE_DEFAULT;

/// How far a recommendation can be trusted, from GPU cores, generation and memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confidence {
    /// Score at most 50 (every host without Apple GPU cores).
    Low,
    /// Score above 50.
    Medium,
    /// Score above 100.
    High,
}

impl Confidence {
    /// `low`, `medium` or `high`, as the TypeScript detector spells them.
    pub fn as_str(self) -> &'static str {
        match self {
            Confidence::Low => "low",
            Confidence::Medium => "medium",
            Confidence::High => "high",
        }
    }

    /// The confidence in a recommendation for `profile`: score = GPU cores × 1.2 × generation
    /// × memory GiB / 16; above 100 high, above 50 medium, else low.
    pub fn of(profile: &HostProfile) -> Confidence {
        let score = f64::from(profile.gpu_cores)
            * 1.2
            * f64::from(profile.chip_generation)
            * profile.memory_gb() as f64
            / 16.0;
        if score > 100.0 {
            Confidence::High
        } else if score > 50.0 {
            Confidence::Medium
        } else {
            Confidence::Low
        }
    }
}

/// Where a limit came from: a tier's, or the requests the worker runs at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitSource {
    /// The hardware table.
    Detected,
    /// The configuration (`tier_limits`, `maxConcurrent`).
    Configured,
}

impl LimitSource {
    /// `detected` or `configured`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitSource::Detected => "detected",
            LimitSource::Configured => "configured",
        }
    }
}

/// Concurrency and queue depth for every tier, with their source and the confidence.
#[derive(Clone, Debug, PartialEq)]
pub struct Recommendation {
    /// One entry per tier, in `ModelTier::ALL` order (see `slot`).
    tiers: [(TierLimit, LimitSource); 5],
    confidence: Confidence,
}

impl Recommendation {
    /// The hardware table's limits for `profile`.
    pub fn for_profile(profile: &HostProfile) -> Recommendation {
        Recommendation {
            tiers: ModelTier::ALL.map(|tier| {
                (
                    default_tier_limit(tier, profile.variant),
                    LimitSource::Detected,
                )
            }),
            confidence: Confidence::of(profile),
        }
    }

    /// Replaces the limits of the tiers that `overrides` (the configuration's `tier_limits`)
    /// names; the others keep the hardware table's.
    pub fn with_overrides(mut self, overrides: &BTreeMap<ModelTier, TierLimit>) -> Recommendation {
        for (tier, limit) in overrides {
            self.tiers[slot(*tier)] = (*limit, LimitSource::Configured);
        }
        self
    }

    /// The limit for `tier`.
    pub fn limit(&self, tier: ModelTier) -> TierLimit {
        self.tiers[slot(tier)].0
    }

    /// Where the limit for `tier` came from.
    pub fn source(&self, tier: ModelTier) -> LimitSource {
        self.tiers[slot(tier)].1
    }

    /// How far the hardware table's figures can be trusted.
    pub fn confidence(&self) -> Confidence {
        self.confidence
    }

    /// Every tier's limit: what the scheduler is configured with.
    pub fn tier_limits(&self) -> BTreeMap<ModelTier, TierLimit> {
        ModelTier::ALL
            .into_iter()
            .map(|tier| (tier, self.limit(tier)))
            .collect()
    }
}

/// The streams of one model the engine is asked to decode together, by the model's tier.
///
/// The engine caps the figure with its own bound on live streams. The default is the MLX
/// runtime's own default for every model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSizes {
    /// One figure per tier, each at least 1, in `ModelTier::ALL` order (see `slot`).
    tiers: [usize; 5],
}

impl BatchSizes {
    /// `size` (at least 1) for every tier.
    pub fn uniform(size: usize) -> BatchSizes {
        BatchSizes {
            tiers: [size.max(1); 5],
        }
    }

    /// Each tier its requests at once under `recommendation` (pass the one with the
    /// configuration's overrides applied: a batch the tier never fills holds memory for
    /// nothing).
    pub fn recommended(recommendation: &Recommendation) -> BatchSizes {
        BatchSizes {
            tiers: ModelTier::ALL.map(|tier| recommendation.limit(tier).max_concurrent.max(1)),
        }
    }

    /// What the configuration asks for: 1 for every tier when `batching` is off, else
    /// `batch_size` for every tier when it is set, else [`BatchSizes::recommended`].
    pub fn configured(
        batching: bool,
        batch_size: Option<usize>,
        recommendation: &Recommendation,
    ) -> BatchSizes {
        BatchSizes::configured_or(batching, batch_size, || {
            BatchSizes::recommended(recommendation)
        })
    }

    /// As [`BatchSizes::configured`], with `otherwise` when batching is on and no size is
    /// set (a caller without the hardware table passes the runtime's default).
    pub fn configured_or(
        batching: bool,
        batch_size: Option<usize>,
        otherwise: impl FnOnce() -> BatchSizes,
    ) -> BatchSizes {
        match (batching, batch_size) {
            (false, _) => BatchSizes::uniform(1),
            (true, Some(size)) => BatchSizes::uniform(size),
            (true, None) => otherwise(),
        }
    }

    /// The batch size asked for a model of `tier`.
    pub fn for_tier(&self, tier: ModelTier) -> usize {
        self.tiers[slot(tier)]
    }
}

impl Default for BatchSizes {
    fn default() -> Self {
        BatchSizes::uniform(RUNTIME_BATCH_SIZE_DEFAULT)
    }
}

/// The position of `tier` in [`ModelTier::ALL`].
fn slot(tier: ModelTier) -> usize {
    match tier {
        ModelTier::Huge => 0,
        ModelTier::Large => 1,
        ModelTier::Medium => 2,
        ModelTier::Small => 3,
        ModelTier::Tiny => 4,
    }
}

/// The hardware table's limit for `tier` on a chip of `variant`: the
/// tier's base scaled by the variant's multiplier (Base 1.0, Pro 1.5, Max 2.5, Ultra 4.0).
pub fn default_tier_limit(tier: ModelTier, variant: ChipVariant) -> TierLimit {
    // (base, min, max) of maxConcurrent, then of queueDepth.
    let [max_concurrent, queue_depth] = match tier {
        ModelTier::Huge => [(1, 1, 20), (10, 5, 50)],
        ModelTier::Large => [(3, 2, 30), (20, 10, 60)],
        ModelTier::Medium => [(6, 4, 40), (30, 15, 80)],
        ModelTier::Small => [(8, 6, 50), (40, 20, 100)],
        ModelTier::Tiny => [(10, 8, 60), (50, 30, 120)],
    };
    let multiplier_tenths = match variant {
        ChipVariant::Base => 10,
        ChipVariant::Pro => 15,
        ChipVariant::Max => 25,
        ChipVariant::Ultra => 40,
    };
    TierLimit {
        max_concurrent: scale(max_concurrent, multiplier_tenths),
        queue_depth: scale(queue_depth, multiplier_tenths),
    }
}

/// `round(base × multiplier)` with halves rounded up (JavaScript's `Math.round`), clamped to
/// `min..=max`; the multiplier is in tenths so the rounding is exact.
fn scale((base, min, max): (usize, usize, usize), multiplier_tenths: usize) -> usize {
    ((base * multiplier_tenths + 5) / 10).clamp(min, max)
}

/// What the host can take on: the registration's `capabilities`.
#[derive(Clone, Debug, PartialEq)]
pub struct Capabilities {
    /// Tiers the host can serve, largest first; `<3B` always.
    pub supported_tiers: Vec<ModelTier>,
    /// The recommendation's `max_concurrent` for the largest supported tier.
    pub max_concurrent: usize,
    /// Memory available to models: 0.8 × the memory in whole GiB.
    pub available_memory_gb: f64,
}

impl Capabilities {
    /// The capabilities of `profile` under `recommendation` (pass the one with the
    /// configuration's overrides applied, so `max_concurrent` is what the worker will run).
    pub fn of(profile: &HostProfile, recommendation: &Recommendation) -> Capabilities {
        let supported_tiers: Vec<ModelTier> = ModelTier::ALL
            .into_iter()
            .filter(|tier| supports(profile, *tier))
            .collect();
        let largest = supported_tiers.first().copied().unwrap_or(ModelTier::Tiny);
        Capabilities {
            max_concurrent: recommendation.limit(largest).max_concurrent,
            supported_tiers,
            // Rounded to a tenth: 0.8 × 24 is 19.2, not 19.200000000000003.
            available_memory_gb: (8.0 * profile.memory_gb() as f64).round() / 10.0,
        }
    }
}

/// Whether `profile` can serve `tier`: GPU cores and memory (whole GiB) at least the tier's
/// thresholds (30 & 64 GiB for `30B+`, 20 & 32 for `13-27B`, 15 & 16 for `7-13B`, 10 & 8 for
/// `3-7B`, nothing for `<3B`).
///
/// A host without Apple GPU cores (`gpu_cores == 0`: Linux) is judged on memory alone, with
/// the same thresholds: its model runs from system memory.
pub fn supports(profile: &HostProfile, tier: ModelTier) -> bool {
    let (gpu_cores_min, memory_gb_min) = match tier {
        ModelTier::Huge => (30, 64),
        ModelTier::Large => (20, 32),
        ModelTier::Medium => (15, 16),
        ModelTier::Small => (10, 8),
        ModelTier::Tiny => return true,
    };
    let enough_gpu = profile.gpu_cores == 0 || profile.gpu_cores >= gpu_cores_min;
    enough_gpu && profile.memory_gb() >= memory_gb_min
}

#[cfg(test)]
mod tests;
