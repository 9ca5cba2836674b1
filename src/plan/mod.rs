//! The worker's plan for this host: how much it runs and queues at once, each model's tier,
//! and what the registration announces (hardware, capabilities), from the probe's profile, the
//! configured limits and the models the engine serves, with the streams the engine runs at
//! once. Pure, but for the one log line that says which figure bounds the requests at once.
//!
//! - [`tier`]: [`ModelTier`], the unit in which concurrency is planned.
//! - [`model_size`]: a model's tier from its parameter count (estimated from its `config.json`
//!   by [`model_size::parameters_from_config`]), name or size on disk.
//! - [`recommendation`]: the per-tier concurrency table, its confidence, the tiers a host can
//!   serve, the configuration's overrides, and the batch size the engine is asked for each
//!   model ([`recommendation::BatchSizes`]).
//! - [`report`]: the JSON document `mlx-worker probe` prints.
//! - here: [`TierLimit`], the scheduler's bounds ([`SchedulerLimits`]), what the plan takes
//!   of the configuration ([`Settings`]) and of the engine ([`ServedModel`]), and the [`Plan`]
//!   itself, with how it chose the requests it runs at once ([`InflightChoice`]).
//!
//! The plan takes plain values: the configuration, the scheduler and the engine's catalog
//! depend on it, never the reverse. It reads the host's profile (`hardware`) and builds the
//! registration's wire shapes (`protocol`), the conversion of domain types at the edge.

pub mod model_size;
pub mod recommendation;
pub mod report;
#[cfg(test)]
mod tests;
pub mod tier;

use std::collections::{BTreeMap, HashMap};

use tracing::info;

pub use tier::{ModelTier, UnknownTier};

use crate::hardware::HostProfile;
use crate::protocol::{HardwareProfile, WorkerCapabilities};
use model_size::{ModelFacts, planned_tier};
use recommendation::{Capabilities, LimitSource, Recommendation};

use crate::limits::{
    PREFIX_CACHE_BYTES_DEFAULT_MAX, PREFIX_CACHE_BYTES_DEFAULT_MIN, PREFIX_CACHE_MEMORY_DIVISOR,
};

/// The bytes each model's prefix cache may hold unless configured: a tenth of the host's
/// memory, at least 64 MiB and at most 8 GiB. KV bytes beyond what the running streams hold
/// then take at most that share from the memory the models' weights and batches have.
pub fn prefix_cache_bytes_default(memory_bytes: u64) -> u64 {
    (memory_bytes / PREFIX_CACHE_MEMORY_DIVISOR).clamp(
        PREFIX_CACHE_BYTES_DEFAULT_MIN,
        PREFIX_CACHE_BYTES_DEFAULT_MAX,
    )
}

/// Concurrency bounds of one model tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierLimit {
    /// Requests of this tier that may run at once.
    pub max_concurrent: usize,
    /// Requests of this tier that may wait.
    pub queue_depth: usize,
}

/// The scheduler's bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerLimits {
    /// Requests running at once, across tiers.
    pub inflight_max: usize,
    /// Requests waiting, across tiers.
    pub queue_depth_max: usize,
    /// Per-tier bounds; a tier missing here takes nothing.
    pub tiers: BTreeMap<ModelTier, TierLimit>,
    /// Requests of one model that may run at once (the engine's capacity for it), by model id;
    /// a model missing here is bounded by its tier and the whole alone.
    pub models: BTreeMap<String, usize>,
}

/// What the plan takes of the worker's configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    /// Requests running at once (`maxConcurrent`); `None` takes the hardware recommendation.
    pub inflight_max: Option<usize>,
    /// Requests waiting at most.
    pub queue_depth_max: usize,
    /// Per-tier overrides of the hardware recommendation.
    pub tier_limits: BTreeMap<ModelTier, TierLimit>,
}

/// A model the engine serves, as the plan sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServedModel<'a> {
    /// What is known of its size (its `name` is the model id).
    pub facts: ModelFacts<'a>,
    /// Generations of it the engine runs at once, when the engine says.
    pub streams_max: Option<usize>,
}

/// How the plan chose the requests the worker runs at once: the smaller of the configured
/// figure and the engine's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InflightChoice {
    /// The configured figure: `maxConcurrent`, else the hardware table's for the most
    /// permissive tier of the served models.
    pub configured: usize,
    /// Where `configured` came from: `Configured` for `maxConcurrent`, `Detected` for the
    /// hardware table.
    pub configured_source: LimitSource,
    /// The engine's figure: the largest number of streams it runs at once of any served model
    /// (models may share one bound, so the whole can take no more); `None` when it says none.
    pub engine: Option<usize>,
    /// What the worker runs at once: the smaller of the two, at least 1.
    pub chosen: usize,
}

impl InflightChoice {
    /// Whether the engine's figure is the one that bounds (the configured one is larger).
    pub fn engine_bounds(&self) -> bool {
        self.engine.is_some_and(|engine| engine < self.configured)
    }

    fn log(&self) {
        let engine = self
            .engine
            .map_or_else(|| "unstated".to_owned(), |n| n.to_string());
        let bound_by = if self.engine_bounds() {
            "engine"
        } else {
            "configuration"
        };
        info!(
            inflight_max = self.chosen,
            engine = %engine,
            configured = self.configured,
            configured_source = self.configured_source.as_str(),
            bound_by,
            "requests at once: the smaller of the engine's figure and the configured one"
        );
    }
}

/// What the worker will run, and how much at once.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The scheduler's limits.
    pub scheduler: SchedulerLimits,
    /// Each served model's tier.
    pub model_tiers: HashMap<String, ModelTier>,
    /// How `scheduler.inflight_max` was chosen.
    pub inflight: InflightChoice,
    /// What the registration announces.
    pub capabilities: WorkerCapabilities,
}

impl Plan {
    /// Plans for `profile`, with the configured `settings`, for the `models` the engine serves,
    /// and logs which figure bounds the requests run at once.
    pub fn new(profile: &HostProfile, settings: &Settings, models: &[ServedModel<'_>]) -> Plan {
        let recommendation =
            Recommendation::for_profile(profile).with_overrides(&settings.tier_limits);
        let tiers: BTreeMap<ModelTier, TierLimit> = recommendation.tier_limits();
        let model_tiers: HashMap<String, ModelTier> = models
            .iter()
            .map(|model| (model.facts.name.to_owned(), planned_tier(&model.facts)))
            .collect();
        let capabilities = Capabilities::of(profile, &recommendation);
        // By default the worker runs as many requests at once as the most permissive tier of
        // the models it serves allows; each tier's own limit still applies.
        let (configured, configured_source) = match settings.inflight_max {
            Some(n) => (n, LimitSource::Configured),
            None => (
                model_tiers
                    .values()
                    .map(|t| recommendation.limit(*t).max_concurrent)
                    .max()
                    .unwrap_or(capabilities.max_concurrent),
                LimitSource::Detected,
            ),
        };
        let engine = models.iter().filter_map(|m| m.streams_max).max();
        let inflight = InflightChoice {
            configured,
            configured_source,
            engine,
            chosen: engine.map_or(configured, |e| e.min(configured)).max(1),
        };
        inflight.log();
        let inflight_max = inflight.chosen;
        // The worker hands the engine no more streams of a model than it runs.
        let model_limits: BTreeMap<String, usize> = models
            .iter()
            .filter_map(|m| {
                let max = m.streams_max?.min(configured).max(1);
                Some((m.facts.name.to_owned(), max))
            })
            .collect();
        Plan {
            scheduler: SchedulerLimits {
                inflight_max,
                queue_depth_max: settings.queue_depth_max,
                tiers,
                models: model_limits,
            },
            model_tiers,
            inflight,
            capabilities: WorkerCapabilities {
                max_concurrent: u32::try_from(inflight_max).unwrap_or(u32::MAX),
                supported_model_tiers: capabilities
                    .supported_tiers
                    .iter()
                    .map(|t| t.as_str().to_owned())
                    .collect(),
                available_memory_gb: capabilities.available_memory_gb,
            },
        }
    }

    /// The registration's `hardware`, taken at `detected_at` (Unix milliseconds).
    pub fn hardware_wire(&self, profile: &HostProfile, detected_at: u64) -> HardwareProfile {
        HardwareProfile {
            chip_model: profile.chip_model.clone(),
            chip_generation: profile.chip_generation,
            variant: profile.variant.as_str().to_owned(),
            gpu_cores: profile.gpu_cores,
            cpu_cores: profile.cpu_cores,
            performance_cores: profile.performance_cores,
            efficiency_cores: profile.efficiency_cores,
            unified_memory_gb: (profile.memory_bytes as f64 / f64::from(1u32 << 30)).round(),
            metal_version: profile
                .metal_version
                .clone()
                .unwrap_or_else(|| "Unknown".to_owned()),
            os_version: profile.os_version.clone(),
            detected_at,
        }
    }
}
