// Goal: a macOS profile and sample are read correctly from each chip's real tool output, and
// every missing or malformed source gives its documented fallback or a clear error.
// Method: build `MacSources` from the captured outputs under fixtures/probes/mac/<chip>/ (a
// file that is absent stands for a tool that failed) and compare whole profiles; parse the
// per-sample outputs and the malformed fixtures directly.

use super::*;
use crate::hardware::tests::{fixture, fixture_if_present};

const GIB: u64 = 1 << 30;

/// Fallback counts chosen to differ from every fixture, so a fallback shows.
const COUNTS: HostCounts = HostCounts {
    cpu_cores: 3,
    memory_bytes: 5 * GIB,
};

fn sources(chip: &str) -> MacSources {
    let read = |file: &str| fixture_if_present(&format!("mac/{chip}/{file}"));
    MacSources {
        brand_string: read("brand_string.txt"),
        memsize: read("memsize.txt"),
        logical_cpus: read("logicalcpu.txt"),
        performance_cpus: read("perflevel0_logicalcpu.txt"),
        efficiency_cpus: read("perflevel1_logicalcpu.txt"),
        product_version: read("sw_vers.txt"),
        displays_json: read("system_profiler_displays.json"),
    }
}

/// An Apple Silicon profile; `cores` is (all, performance, efficiency, gpu).
fn apple(
    chip_model: &str,
    variant: ChipVariant,
    generation: u32,
    cores: (u32, u32, u32, u32),
    memory_gb: u64,
    metal: &str,
    macos: &str,
) -> HostProfile {
    HostProfile {
        chip_model: chip_model.to_owned(),
        chip_generation: generation,
        variant,
        cpu_brand: format!("Apple {}", chip_model.replace('-', " ")),
        cpu_cores: cores.0,
        performance_cores: cores.1,
        efficiency_cores: cores.2,
        gpu_cores: cores.3,
        gpus: Vec::new(),
        memory_bytes: memory_gb * GIB,
        metal_version: Some(metal.to_owned()),
        os_version: format!("macOS {macos}"),
    }
}

#[track_caller]
fn check(chip: &str, expected: HostProfile) {
    assert_eq!(mac_profile(&sources(chip), COUNTS), expected, "{chip}");
}

#[test]
fn reads_an_m1_profile() {
    let expected = apple(
        "M1",
        ChipVariant::Base,
        1,
        (8, 4, 4, 8),
        16,
        "Metal 3",
        "14.6.1",
    );
    check("m1", expected);
}

#[test]
fn reads_an_m1_pro_profile() {
    let expected = apple(
        "M1-Pro",
        ChipVariant::Pro,
        1,
        (10, 8, 2, 16),
        32,
        "Metal 3",
        "13.6.7",
    );
    check("m1-pro", expected);
}

#[test]
fn reads_an_m2_max_profile() {
    let expected = apple(
        "M2-Max",
        ChipVariant::Max,
        2,
        (12, 8, 4, 38),
        64,
        "Metal 3",
        "14.4.1",
    );
    check("m2-max", expected);
}

#[test]
fn reads_an_m3_ultra_profile() {
    let expected = apple(
        "M3-Ultra",
        ChipVariant::Ultra,
        3,
        (32, 24, 8, 80),
        512,
        "Metal 3",
        "15.4",
    );
    check("m3-ultra", expected);
}

#[test]
fn reads_an_m4_pro_profile() {
    let expected = apple(
        "M4-Pro",
        ChipVariant::Pro,
        4,
        (14, 10, 4, 20),
        48,
        "Metal 3",
        "15.1",
    );
    check("m4-pro", expected);
}

#[test]
fn reads_an_m4_max_profile() {
    let expected = apple(
        "M4-Max",
        ChipVariant::Max,
        4,
        (16, 12, 4, 40),
        128,
        "Metal 4",
        "26.0.1",
    );
    check("m4-max", expected);
}

#[test]
fn reads_an_intel_mac_as_unknown_generation_zero() {
    let expected = HostProfile {
        chip_model: "Unknown".to_owned(),
        chip_generation: 0,
        variant: ChipVariant::Base,
        cpu_brand: "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz".to_owned(),
        cpu_cores: 16,
        // No hw.perflevel* on Intel: 4 performance cores, the rest efficiency.
        performance_cores: 4,
        efficiency_cores: 12,
        gpu_cores: 8,
        gpus: Vec::new(),
        memory_bytes: 32 * GIB,
        metal_version: Some("Metal 3".to_owned()),
        os_version: "macOS 13.6.9".to_owned(),
    };
    check("intel-i9", expected);
}

#[test]
fn falls_back_to_the_typescript_profile_when_no_tool_runs() {
    let expected = HostProfile {
        chip_model: "Unknown".to_owned(),
        chip_generation: 1,
        variant: ChipVariant::Base,
        cpu_brand: "Unknown".to_owned(),
        cpu_cores: 3,
        performance_cores: 4,
        efficiency_cores: 0,
        gpu_cores: 8,
        gpus: Vec::new(),
        memory_bytes: 5 * GIB,
        metal_version: None,
        os_version: "Unknown".to_owned(),
    };
    assert_eq!(mac_profile(&MacSources::default(), COUNTS), expected);
}

#[test]
fn estimates_gpu_cores_from_the_brand_without_system_profiler() {
    let sources = MacSources {
        displays_json: None,
        ..sources("m2-max")
    };
    let profile = mac_profile(&sources, COUNTS);
    assert_eq!(profile.gpu_cores, 38);
    assert_eq!(profile.metal_version, None);
}

#[test]
fn estimates_gpu_cores_when_system_profiler_is_malformed() {
    for malformed in [
        "system_profiler_truncated.json",
        "system_profiler_not_an_array.json",
        "system_profiler_bad_cores.json",
    ] {
        let sources = MacSources {
            displays_json: Some(fixture(&format!("malformed/{malformed}"))),
            ..sources("m4-pro")
        };
        let profile = mac_profile(&sources, COUNTS);
        assert_eq!(profile.gpu_cores, 20, "{malformed}");
        assert_eq!(profile.metal_version, None, "{malformed}");
    }
}

#[test]
fn estimates_gpu_cores_in_a_virtual_machine() {
    let sources = MacSources {
        displays_json: Some(fixture("edge/system_profiler_paravirtual.json")),
        ..sources("m1")
    };
    let profile = mac_profile(&sources, COUNTS);
    assert_eq!(profile.gpu_cores, 8);
    assert_eq!(profile.metal_version.as_deref(), Some("Metal 3"));
}

#[test]
fn falls_back_on_unreadable_sysctl_values() {
    let sources = MacSources {
        memsize: Some(fixture("malformed/memsize_garbage.txt")),
        logical_cpus: Some(String::new()),
        performance_cpus: Some("lots\n".to_owned()),
        efficiency_cpus: None,
        ..sources("m1-pro")
    };
    let profile = mac_profile(&sources, COUNTS);
    assert_eq!(profile.memory_bytes, COUNTS.memory_bytes);
    assert_eq!(profile.cpu_cores, COUNTS.cpu_cores);
    assert_eq!(profile.performance_cores, 4);
    assert_eq!(profile.efficiency_cores, 0);
}

#[test]
fn parses_sysctl_values() {
    assert_eq!(
        parse_sysctl_value::<u64>("68719476736\n", "hw.memsize"),
        Ok(68_719_476_736)
    );
    assert_eq!(
        parse_sysctl_value::<u32>("", "hw.perflevel1.logicalcpu"),
        Err(ParseError::Empty {
            what: "hw.perflevel1.logicalcpu"
        })
    );
    assert!(matches!(
        parse_sysctl_value::<u32>("99999999999", "hw.logicalcpu"),
        Err(ParseError::InvalidValue { .. })
    ));
}

#[test]
fn parses_product_versions() {
    assert_eq!(parse_product_version("15.4\n"), Ok("macOS 15.4".to_owned()));
    assert!(parse_product_version("").is_err());
    assert!(parse_product_version("ProductName: macOS").is_err());
}

#[test]
fn reads_metal_versions_from_system_profiler() {
    let displays = parse_displays_json(&fixture("mac/m4-max/system_profiler_displays.json"));
    assert_eq!(
        displays,
        Ok(Displays {
            gpu_cores: Some(40),
            metal_version: Some("Metal 4".to_owned()),
        })
    );
    assert_eq!(
        metal_version("spdisplays_mtlgpufamilymac2"),
        "mtlgpufamilymac2"
    );
}

#[test]
fn reports_why_system_profiler_output_is_malformed() {
    let parse = |name: &str| parse_displays_json(&fixture(&format!("malformed/{name}")));
    assert!(matches!(
        parse("system_profiler_truncated.json"),
        Err(ParseError::InvalidJson { .. })
    ));
    assert_eq!(
        parse("system_profiler_not_an_array.json"),
        Err(ParseError::MissingField {
            what: "system_profiler SPDisplaysDataType",
            field: "SPDisplaysDataType array",
        })
    );
    assert_eq!(
        parse("system_profiler_bad_cores.json"),
        Err(ParseError::InvalidValue {
            what: "sppci_cores",
            value: "\"ten\"".to_owned(),
            expected: "count",
        })
    );
}

#[test]
fn reads_gpu_utilization_from_each_chips_ioreg() {
    let cases = [
        ("m1", 7.0),
        ("m1-pro", 0.0),
        ("m2-max", 93.0),
        ("m3-ultra", 100.0),
        ("m4-pro", 24.0),
        ("m4-max", 56.0),
        // Integrated 2 %, discrete 17 %: the busiest.
        ("intel-i9", 17.0),
    ];
    for (chip, expected) in cases {
        let output = fixture(&format!("mac/{chip}/ioreg_accelerator.txt"));
        assert_eq!(parse_ioreg_gpu_utilization(&output), Ok(expected), "{chip}");
    }
}

#[test]
fn reports_why_ioreg_output_has_no_utilization() {
    assert_eq!(
        parse_ioreg_gpu_utilization(""),
        Err(ParseError::Empty {
            what: "ioreg IOAccelerator"
        })
    );
    assert_eq!(
        parse_ioreg_gpu_utilization(&fixture("malformed/ioreg_no_statistics.txt")),
        Err(ParseError::MissingField {
            what: "ioreg IOAccelerator",
            field: "PerformanceStatistics",
        })
    );
    assert_eq!(
        parse_ioreg_gpu_utilization(&fixture("malformed/ioreg_utilization_over_100.txt")),
        Err(ParseError::AboveLimit {
            what: "Device Utilization %",
            value: 250.0,
            limit: 100.0,
        })
    );
}

#[test]
fn reads_memory_pressure_as_the_share_not_free() {
    let cases = [
        ("m1", 0.43),
        ("m1-pro", 0.29),
        ("m2-max", 0.82),
        ("m3-ultra", 0.94),
        ("m4-pro", 0.36),
        ("m4-max", 0.58),
        ("intel-i9", 0.52),
    ];
    for (chip, expected) in cases {
        let output = fixture(&format!("mac/{chip}/memory_pressure.txt"));
        let pressure = parse_memory_pressure(&output).unwrap();
        assert!((pressure - expected).abs() < 1e-9, "{chip}: {pressure}");
    }
}

#[test]
fn reports_memory_pressure_output_without_a_percentage() {
    assert_eq!(
        parse_memory_pressure(&fixture("malformed/memory_pressure_usage.txt")),
        Err(ParseError::MissingField {
            what: "memory_pressure -Q",
            field: "free percentage",
        })
    );
    assert!(matches!(
        parse_memory_pressure("System-wide memory free percentage: -3%"),
        Err(ParseError::InvalidValue { .. })
    ));
}
