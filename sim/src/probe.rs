//! [`SimProbe`]: a scripted [`HardwareProbe`] whose figures a test sets.

use std::sync::Mutex;

use async_trait::async_trait;
use mlx_worker::hardware::{ChipVariant, HardwareProbe, HostProfile, HostSample};

/// A scripted probe.
#[derive(Debug)]
pub struct SimProbe {
    profile: HostProfile,
    sample: Mutex<HostSample>,
}

impl SimProbe {
    /// An M2 Max with 64 GiB, idle.
    pub fn new() -> SimProbe {
        SimProbe {
            profile: HostProfile {
                chip_model: "M2-Max".to_owned(),
                chip_generation: 2,
                variant: ChipVariant::Max,
                cpu_brand: "Apple M2 Max".to_owned(),
                cpu_cores: 12,
                performance_cores: 8,
                efficiency_cores: 4,
                gpu_cores: 38,
                gpus: Vec::new(),
                memory_bytes: 64 << 30,
                metal_version: Some("Metal 3".to_owned()),
                os_version: "macOS 14.5".to_owned(),
            },
            sample: Mutex::new(HostSample {
                cpu_usage_percent: 5.0,
                memory_used_bytes: 8 << 30,
                memory_total_bytes: 64 << 30,
                gpu_utilization_percent: Some(0.0),
                memory_pressure: Some(0.1),
            }),
        }
    }

    /// Sets the figures the next samples report.
    pub fn set_sample(&self, sample: HostSample) {
        *self.sample.lock().unwrap_or_else(|p| p.into_inner()) = sample;
    }
}

impl Default for SimProbe {
    fn default() -> Self {
        SimProbe::new()
    }
}

#[async_trait]
impl HardwareProbe for SimProbe {
    async fn profile(&self) -> HostProfile {
        self.profile.clone()
    }

    async fn sample(&self) -> HostSample {
        self.sample
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
