// Goal: the `mlx-worker probe` report carries the profile, the sample, every tier's limit with
// its source, and the capabilities, under stable camelCase keys.
// Method: insta snapshots of the report for the captured M2 Max (with one configured
// override) and for a Linux host with two GPUs and unknown memory pressure.

use std::collections::BTreeMap;

use super::*;
use crate::hardware::HostCounts;
use crate::hardware::linux::{LinuxSources, linux_profile};
use crate::hardware::mac::{MacSources, mac_profile};
use crate::hardware::tests::fixture_if_present;
use crate::plan::TierLimit;

const COUNTS: HostCounts = HostCounts {
    cpu_cores: 1,
    memory_bytes: 1 << 30,
};

#[test]
fn reports_an_m2_max_with_an_override() {
    let read = |file: &str| fixture_if_present(&format!("mac/m2-max/{file}"));
    let sources = MacSources {
        brand_string: read("brand_string.txt"),
        memsize: read("memsize.txt"),
        logical_cpus: read("logicalcpu.txt"),
        performance_cpus: read("perflevel0_logicalcpu.txt"),
        efficiency_cpus: read("perflevel1_logicalcpu.txt"),
        product_version: read("sw_vers.txt"),
        displays_json: read("system_profiler_displays.json"),
    };
    let profile = mac_profile(&sources, COUNTS);
    let sample = HostSample {
        cpu_usage_percent: 37.5,
        memory_used_bytes: 48 << 30,
        memory_total_bytes: profile.memory_bytes,
        gpu_utilization_percent: Some(93.0),
        memory_pressure: Some(0.82),
    };
    let overrides = BTreeMap::from([(
        ModelTier::Huge,
        TierLimit {
            max_concurrent: 2,
            queue_depth: 8,
        },
    )]);
    let recommendation = Recommendation::for_profile(&profile).with_overrides(&overrides);
    insta::assert_json_snapshot!(probe_report(&profile, &sample, &recommendation));
}

#[test]
fn reports_a_linux_host_with_two_gpus() {
    let read = |file: &str| fixture_if_present(&format!("linux/ryzen-2x4090/{file}"));
    let sources = LinuxSources {
        cpuinfo: read("cpuinfo.txt"),
        meminfo: read("meminfo.txt"),
        os_release: read("os_release.txt"),
        kernel_release: read("kernel_osrelease.txt"),
        nvidia_smi: read("nvidia_smi.csv"),
    };
    let profile = linux_profile(&sources, COUNTS);
    let sample = HostSample {
        cpu_usage_percent: 0.0,
        memory_used_bytes: 40 << 30,
        memory_total_bytes: profile.memory_bytes,
        gpu_utilization_percent: Some(50.0),
        memory_pressure: None,
    };
    let recommendation = Recommendation::for_profile(&profile);
    insta::assert_json_snapshot!(probe_report(&profile, &sample, &recommendation));
}
