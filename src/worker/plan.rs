//! The worker's plan for this host: the scheduler's limits, each model's tier, and what the
//! registration announces (hardware, capabilities), from the probe's profile, the configuration
//! and the engine's catalog. Pure.

use std::collections::{BTreeMap, HashMap};

use crate::config::{NodeConfig, TierLimit};
use crate::engine::Catalog;
use crate::hardware::HostProfile;
use crate::hardware::model_size::{ModelFacts, model_tier};
use crate::hardware::recommendation::{Capabilities, Recommendation};
use crate::protocol::{HardwareProfile, WorkerCapabilities};
use crate::scheduler::SchedulerLimits;
use crate::tier::ModelTier;

/// What the worker will run, and how much at once.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The scheduler's limits.
    pub scheduler: SchedulerLimits,
    /// Each served model's tier.
    pub model_tiers: HashMap<String, ModelTier>,
    /// What the registration announces.
    pub capabilities: WorkerCapabilities,
}

impl Plan {
    /// Plans for `profile`, with the configuration's overrides, for the models of `catalog`.
    pub fn new(profile: &HostProfile, config: &NodeConfig, catalog: &Catalog) -> Plan {
        let recommendation =
            Recommendation::for_profile(profile).with_overrides(&config.tier_limits);
        let tiers: BTreeMap<ModelTier, TierLimit> = recommendation.tier_limits();
        let model_tiers: HashMap<String, ModelTier> = catalog
            .models
            .iter()
            .map(|(id, entry)| {
                let facts = ModelFacts {
                    parameter_count: entry.parameter_count,
                    name: id,
                    disk_bytes: Some(entry.size_bytes),
                };
                // A model whose size nothing tells is planned as a mid-sized one.
                (id.clone(), model_tier(&facts).unwrap_or(ModelTier::Medium))
            })
            .collect();
        let capabilities = Capabilities::of(profile, &recommendation);
        // By default the worker runs as many requests at once as the most permissive tier of
        // the models it serves allows; each tier's own limit still applies.
        let inflight_max = config
            .inflight_max
            .or_else(|| {
                model_tiers
                    .values()
                    .map(|t| recommendation.limit(*t).max_concurrent)
                    .max()
            })
            .unwrap_or(capabilities.max_concurrent)
            .max(1);
        Plan {
            scheduler: SchedulerLimits {
                inflight_max,
                queue_depth_max: config.queue_depth_max,
                tiers,
            },
            model_tiers,
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
