//! The JSON document `mlx-worker probe` prints: the detected profile, one load sample, the
//! per-tier recommendation and the capabilities derived from them.
//!
//! Built by hand with `serde_json::json!` (domain types derive no `Serialize`); keys are
//! camelCase like the wire's, and lists keep the largest-tier-first order.

use serde_json::{Value, json};

use super::ModelTier;
use super::recommendation::{Capabilities, Recommendation};
use crate::hardware::{HostProfile, HostSample, UNKNOWN};

/// Renders the `mlx-worker probe` report: `profile`, `sample`, `recommendation` (pass the one
/// with the configuration's overrides applied; each tier says whether its limit was detected
/// or configured) and the `capabilities` the registration would carry.
pub fn probe_report(
    profile: &HostProfile,
    sample: &HostSample,
    recommendation: &Recommendation,
) -> Value {
    let capabilities = Capabilities::of(profile, recommendation);
    json!({
        "profile": profile_json(profile),
        "sample": sample_json(sample),
        "recommendation": recommendation_json(recommendation),
        "capabilities": capabilities_json(&capabilities),
    })
}

fn profile_json(profile: &HostProfile) -> Value {
    let gpus: Vec<Value> = profile
        .gpus
        .iter()
        .map(|gpu| json!({ "name": gpu.name, "memoryBytes": gpu.memory_bytes }))
        .collect();
    json!({
        "chipModel": profile.chip_model,
        "chipGeneration": profile.chip_generation,
        "variant": profile.variant.as_str(),
        "cpuBrand": profile.cpu_brand,
        "cpuCores": profile.cpu_cores,
        "performanceCores": profile.performance_cores,
        "efficiencyCores": profile.efficiency_cores,
        "gpuCores": profile.gpu_cores,
        "gpus": gpus,
        "memoryBytes": profile.memory_bytes,
        "unifiedMemoryGB": profile.memory_gb(),
        "metalVersion": profile.metal_version.as_deref().unwrap_or(UNKNOWN),
        "osVersion": profile.os_version,
    })
}

fn sample_json(sample: &HostSample) -> Value {
    json!({
        "cpuUsagePercent": sample.cpu_usage_percent,
        "memoryUsedBytes": sample.memory_used_bytes,
        "memoryTotalBytes": sample.memory_total_bytes,
        "memoryUsedGB": sample.memory_used_gb(),
        "gpuUtilizationPercent": sample.gpu_utilization_percent,
        "memoryPressure": sample.memory_pressure,
    })
}

fn recommendation_json(recommendation: &Recommendation) -> Value {
    let tiers: Vec<Value> = ModelTier::ALL
        .into_iter()
        .map(|tier| {
            let limit = recommendation.limit(tier);
            json!({
                "tier": tier.as_str(),
                "maxConcurrent": limit.max_concurrent,
                "queueDepth": limit.queue_depth,
                "source": recommendation.source(tier).as_str(),
            })
        })
        .collect();
    json!({
        "confidence": recommendation.confidence().as_str(),
        "tiers": tiers,
    })
}

fn capabilities_json(capabilities: &Capabilities) -> Value {
    let tiers: Vec<&str> = capabilities
        .supported_tiers
        .iter()
        .map(|tier| tier.as_str())
        .collect();
    json!({
        "maxConcurrent": capabilities.max_concurrent,
        "supportedModelTiers": tiers,
        "availableMemoryGB": capabilities.available_memory_gb,
    })
}

#[cfg(test)]
mod tests;
