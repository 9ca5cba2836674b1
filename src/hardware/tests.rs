// Goal: no parser panics on any input, the errors an operator reads are worded as the
// conventions require, the memory units round as the wire expects, and the production probes
// read this host sanely.
// Method: proptest over arbitrary strings, printable tool-like text and fixtures with random
// splices; an insta snapshot of the error messages; the real probes run against this host.

use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;

/// The path of a fixture under fixtures/probes/.
fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/probes")
        .join(name)
}

/// The text of a fixture under fixtures/probes/.
#[track_caller]
pub(crate) fn fixture(name: &str) -> String {
    let path = fixture_path(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("fixture {} is unreadable: {err}", path.display()))
}

/// The text of a fixture, or `None` when the file does not exist: the tool it stands for failed
/// on that host.
pub(crate) fn fixture_if_present(name: &str) -> Option<String> {
    fixture_path(name).exists().then(|| fixture(name))
}

/// Every parser and profile builder, fed the same text; the results are dropped.
fn parse_everything(text: &str) {
    let _ = chip::parse_brand_string(text);
    let _ = mac::parse_sysctl_value::<u64>(text, "hw.memsize");
    let _ = mac::parse_sysctl_value::<u32>(text, "hw.logicalcpu");
    let _ = mac::parse_product_version(text);
    let _ = mac::parse_displays_json(text);
    let _ = mac::parse_ioreg_gpu_utilization(text);
    let _ = mac::parse_memory_pressure(text);
    let _ = linux::parse_cpuinfo(text);
    let _ = linux::parse_meminfo(text);
    let _ = linux::parse_os_release(text);
    let _ = linux::parse_kernel_release(text);
    let _ = linux::parse_nvidia_smi(text);
    let counts = HostCounts {
        cpu_cores: 1,
        memory_bytes: 1,
    };
    let some = Some(text.to_owned());
    let mac_sources = mac::MacSources {
        brand_string: some.clone(),
        memsize: some.clone(),
        logical_cpus: some.clone(),
        performance_cpus: some.clone(),
        efficiency_cpus: some.clone(),
        product_version: some.clone(),
        displays_json: some.clone(),
    };
    let _ = mac::mac_profile(&mac_sources, counts);
    let linux_sources = linux::LinuxSources {
        cpuinfo: some.clone(),
        meminfo: some.clone(),
        os_release: some.clone(),
        kernel_release: some.clone(),
        nvidia_smi: some,
    };
    let _ = linux::linux_profile(&linux_sources, counts);
}

/// Fixtures whose random splices the parsers must survive.
const SPLICED_FIXTURES: [&str; 8] = [
    "mac/m2-max/system_profiler_displays.json",
    "mac/intel-i9/ioreg_accelerator.txt",
    "mac/m1/memory_pressure.txt",
    "mac/m3-ultra/brand_string.txt",
    "linux/ryzen-2x4090/nvidia_smi.csv",
    "linux/epyc-vm/meminfo.txt",
    "linux/graviton-arm/cpuinfo.txt",
    "linux/xeon-a100/os_release.txt",
];

proptest! {
    #[test]
    fn no_parser_panics_on_arbitrary_text(text in any::<String>()) {
        parse_everything(&text);
    }

    #[test]
    fn no_parser_panics_on_tool_like_text(
        text in r#"([a-zA-Z0-9 .,:=%"{}\[\]_-]{0,20}\n?){0,10}"#,
    ) {
        parse_everything(&text);
    }

    #[test]
    fn no_parser_panics_on_spliced_fixtures(
        which in 0..SPLICED_FIXTURES.len(),
        cut in any::<prop::sample::Index>(),
        cut_len in 0usize..40,
        insert in r#"[ -~\n]{0,12}"#,
    ) {
        let original = fixture(SPLICED_FIXTURES[which]);
        let start = cut.index(original.len() + 1);
        let end = (start + cut_len).min(original.len());
        let spliced = format!("{}{insert}{}", &original[..start], &original[end..]);
        parse_everything(&spliced);
    }
}

#[test]
fn error_messages_state_the_value_and_the_limit() {
    let errors = [
        ParseError::Empty { what: "hw.memsize" }.to_string(),
        ParseError::MissingField {
            what: "/proc/meminfo",
            field: "MemTotal",
        }
        .to_string(),
        ParseError::invalid("sppci_cores", &"9".repeat(100), "count").to_string(),
        ParseError::AboveLimit {
            what: "Device Utilization %",
            value: 250.0,
            limit: 100.0,
        }
        .to_string(),
        mac::parse_displays_json("{").unwrap_err().to_string(),
        chip::parse_brand_string("Intel(R) Xeon(R) Processor")
            .unwrap_err()
            .to_string(),
        ProbeError::Absent {
            program: "nvidia-smi",
        }
        .to_string(),
        ProbeError::TimedOut {
            program: "system_profiler",
            timeout: std::time::Duration::from_secs(2),
        }
        .to_string(),
        ProbeError::OutputTooLarge {
            program: "ioreg",
            limit: 1 << 20,
        }
        .to_string(),
        ProbeError::NotUtf8 { program: "sw_vers" }.to_string(),
    ];
    insta::assert_snapshot!(errors.join("\n"));
}

#[test]
fn memory_rounds_half_up_to_whole_gib() {
    let gb = |memory_bytes: u64| {
        HostProfile {
            memory_bytes,
            ..linux::linux_profile(
                &linux::LinuxSources::default(),
                HostCounts {
                    cpu_cores: 1,
                    memory_bytes: 0,
                },
            )
        }
        .memory_gb()
    };
    assert_eq!(gb(17_179_869_184), 16);
    assert_eq!(gb(GIB + GIB / 2), 2);
    assert_eq!(gb(GIB + GIB / 2 - 1), 1);
    assert_eq!(gb(0), 0);
}

#[test]
fn sample_memory_is_reported_in_fractional_gib() {
    let sample = HostSample {
        cpu_usage_percent: 0.0,
        memory_used_bytes: 3 * GIB / 2,
        memory_total_bytes: 2 * GIB,
        gpu_utilization_percent: None,
        memory_pressure: None,
    };
    assert_eq!(sample.memory_used_gb(), 1.5);
}

#[tokio::test]
async fn linux_probe_reads_this_host() {
    let probe = LinuxProbe::new();
    let profile = probe.profile().await;
    assert!(profile.cpu_cores >= 1, "{profile:?}");
    assert!(profile.memory_bytes > 0, "{profile:?}");
    assert_eq!(profile.chip_generation, 0);
    let sample = probe.sample().await;
    assert!(
        (0.0..=100.0).contains(&sample.cpu_usage_percent),
        "{sample:?}"
    );
    assert!(sample.memory_total_bytes > 0, "{sample:?}");
    assert!(
        sample.memory_used_bytes <= sample.memory_total_bytes,
        "{sample:?}"
    );
    assert_eq!(sample.memory_pressure, None);
}

#[cfg(not(target_os = "macos"))]
#[tokio::test]
async fn mac_probe_gives_the_fallback_profile_off_macos() {
    let probe = MacProbe::new();
    let profile = probe.profile().await;
    assert_eq!(profile.chip_model, "Unknown");
    assert_eq!(profile.chip_generation, 1);
    assert_eq!(profile.variant, ChipVariant::Base);
    assert_eq!(profile.gpu_cores, 8);
    assert_eq!(profile.performance_cores, 4);
    assert_eq!(profile.metal_version, None);
    assert_eq!(profile.os_version, "Unknown");
    let sample = probe.sample().await;
    assert_eq!(sample.gpu_utilization_percent, None);
    assert_eq!(sample.memory_pressure, None);
}

#[cfg(not(target_os = "macos"))]
#[tokio::test]
async fn detect_picks_the_linux_probe_off_macos() {
    let profile = detect().profile().await;
    // The Mac probe's fallback would say generation 1 and 8 GPU cores.
    assert_eq!(profile.chip_generation, 0);
    assert_eq!(profile.gpu_cores, 0);
}
