//! The host's CPU and memory load, read through one long-lived `sysinfo::System`: the cheap,
//! in-process part of every heartbeat sample on every platform.
//!
//! It does not read GPU use or memory pressure (the platform probes run tools for those) and
//! does not look at processes, which would cost ~20× more (see perf-baselines.md).

use std::sync::{Mutex, PoisonError};

use sysinfo::{MemoryRefreshKind, System};

use super::HostCounts;

/// CPU and memory figures of one reading.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Load {
    /// Host-wide CPU use since the previous reading, 0–100.
    pub(crate) cpu_usage_percent: f64,
    /// Memory in use, bytes.
    pub(crate) memory_used_bytes: u64,
    /// Physical memory, bytes.
    pub(crate) memory_total_bytes: u64,
}

/// Keeps the previous CPU counters between readings, so each reading's CPU figure is the use
/// since the one before.
#[derive(Debug)]
pub(crate) struct LoadMeter {
    /// `None` when sysinfo does not support this platform; readings are then all zero. The
    /// lock is held only for the two synchronous refreshes (~0.1 ms), never across an await.
    system: Mutex<Option<System>>,
}

impl LoadMeter {
    /// A meter that has read nothing yet; its first reading's CPU figure may be 0.
    pub(crate) fn new() -> LoadMeter {
        let system = System::new()
            .inspect_err(|cause| tracing::warn!(%cause, "sysinfo unavailable, load reads as 0"))
            .ok();
        LoadMeter {
            system: Mutex::new(system),
        }
    }

    /// The last-resort CPU count and memory size; also primes the CPU counters, so the first
    /// heartbeat after the profile reports a real figure.
    pub(crate) fn host_counts(&self) -> HostCounts {
        let cpu_cores = std::thread::available_parallelism()
            .map_or(1, |count| u32::try_from(count.get()).unwrap_or(u32::MAX));
        HostCounts {
            cpu_cores,
            memory_bytes: self.read().memory_total_bytes,
        }
    }

    /// Refreshes CPU use and RAM figures and returns them.
    ///
    /// sysinfo ignores a CPU refresh less than `sysinfo::MINIMUM_CPU_UPDATE_INTERVAL` (200 ms)
    /// after the previous one and keeps the older figure; heartbeats are seconds apart.
    pub(crate) fn read(&self) -> Load {
        let mut guard = self.system.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(system) = guard.as_mut() else {
            return Load::default();
        };
        system.refresh_cpu_usage();
        system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        Load {
            cpu_usage_percent: percent(system.global_cpu_usage()),
            memory_used_bytes: system.used_memory(),
            memory_total_bytes: system.total_memory(),
        }
    }
}

/// sysinfo's CPU figure as a percentage in 0–100, 0 when it is not a number (no CPU time
/// passed between two readings).
fn percent(usage: f32) -> f64 {
    let usage = f64::from(usage);
    if usage.is_nan() {
        0.0
    } else {
        usage.clamp(0.0, 100.0)
    }
}
