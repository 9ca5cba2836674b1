// Goal: a Linux profile is read correctly from real procfs, os-release and nvidia-smi texts of
// hosts with no, one and two NVIDIA GPUs, and every missing or malformed source gives its
// documented fallback or a clear error.
// Method: build `LinuxSources` from fixtures/probes/linux/<host>/ (an absent file stands for
// a source that could not be read, such as nvidia-smi on a host without it) and compare whole
// profiles; parse the malformed and edge-case fixtures directly.

use super::*;
use crate::hardware::tests::{fixture, fixture_if_present};

const KIB: u64 = 1024;

/// Fallback counts chosen to differ from every fixture, so a fallback shows.
const COUNTS: HostCounts = HostCounts {
    cpu_cores: 3,
    memory_bytes: 5 << 30,
};

fn sources(host: &str) -> LinuxSources {
    let read = |file: &str| fixture_if_present(&format!("linux/{host}/{file}"));
    LinuxSources {
        cpuinfo: read("cpuinfo.txt"),
        meminfo: read("meminfo.txt"),
        os_release: read("os_release.txt"),
        kernel_release: read("kernel_osrelease.txt"),
        nvidia_smi: read("nvidia_smi.csv"),
    }
}

fn linux(cpu_brand: &str, cpu_cores: u32, memory_kib: u64, os_version: &str) -> HostProfile {
    HostProfile {
        chip_model: "Unknown".to_owned(),
        chip_generation: 0,
        variant: ChipVariant::Base,
        cpu_brand: cpu_brand.to_owned(),
        cpu_cores,
        performance_cores: cpu_cores,
        efficiency_cores: 0,
        gpu_cores: 0,
        gpus: Vec::new(),
        memory_bytes: memory_kib * KIB,
        metal_version: None,
        os_version: os_version.to_owned(),
    }
}

fn gpu(name: &str, memory_mib: u64) -> GpuInfo {
    GpuInfo {
        name: name.to_owned(),
        memory_bytes: memory_mib * MIB,
    }
}

#[track_caller]
fn check(host: &str, expected: HostProfile) {
    assert_eq!(linux_profile(&sources(host), COUNTS), expected, "{host}");
}

#[test]
fn reads_a_cloud_vm_without_gpus() {
    let expected = linux(
        "AMD EPYC 7R13 Processor",
        4,
        16_069_160,
        "Ubuntu 22.04.4 LTS, Linux 6.5.0-1017-aws",
    );
    check("epyc-vm", expected);
}

#[test]
fn reads_a_host_with_one_nvidia_gpu() {
    let expected = HostProfile {
        gpus: vec![gpu("NVIDIA A100-SXM4-80GB", 81_920)],
        ..linux(
            "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz",
            8,
            131_890_444,
            "Rocky Linux 9.4 (Blue Onyx), Linux 5.14.0-427.13.1.el9_4.x86_64",
        )
    };
    check("xeon-a100", expected);
}

#[test]
fn reads_a_host_with_two_nvidia_gpus() {
    let expected = HostProfile {
        gpus: vec![
            gpu("NVIDIA GeForce RTX 4090", 24_564),
            gpu("NVIDIA GeForce RTX 4090", 24_564),
        ],
        ..linux(
            "AMD Ryzen 9 7950X 16-Core Processor",
            32,
            65_009_880,
            "Ubuntu 24.04.1 LTS, Linux 6.8.0-45-generic",
        )
    };
    check("ryzen-2x4090", expected);
}

#[test]
fn reads_an_arm_host_without_a_model_name() {
    let expected = linux(
        "Unknown",
        4,
        7_929_452,
        "Amazon Linux 2023.5.20240805, Linux 6.1.102-111.182.amzn2023.aarch64",
    );
    check("graviton-arm", expected);
}

#[test]
fn falls_back_when_no_source_can_be_read() {
    let expected = linux("Unknown", 3, 5 << 20, "Unknown");
    assert_eq!(linux_profile(&LinuxSources::default(), COUNTS), expected);
}

#[test]
fn falls_back_on_malformed_sources() {
    let sources = LinuxSources {
        cpuinfo: Some(fixture("malformed/cpuinfo_empty.txt")),
        meminfo: Some(fixture("malformed/meminfo_bad_value.txt")),
        os_release: Some(fixture("malformed/os_release_no_name.txt")),
        kernel_release: Some("6.8.0 extra words\n".to_owned()),
        nvidia_smi: Some(fixture("malformed/nvidia_smi_driver_failure.csv")),
    };
    let expected = linux("Unknown", 3, 5 << 20, "Unknown");
    assert_eq!(linux_profile(&sources, COUNTS), expected);
}

#[test]
fn names_the_os_from_whichever_half_is_known() {
    let only_kernel = LinuxSources {
        os_release: None,
        ..sources("epyc-vm")
    };
    let profile = linux_profile(&only_kernel, COUNTS);
    assert_eq!(profile.os_version, "Linux 6.5.0-1017-aws");
    let only_distribution = LinuxSources {
        kernel_release: None,
        ..sources("epyc-vm")
    };
    let profile = linux_profile(&only_distribution, COUNTS);
    assert_eq!(profile.os_version, "Ubuntu 22.04.4 LTS");
}

#[test]
fn parses_meminfo_total_and_available() {
    let meminfo = parse_meminfo(&fixture("linux/ryzen-2x4090/meminfo.txt"));
    assert_eq!(
        meminfo,
        Ok(Meminfo {
            total_bytes: 65_009_880 * KIB,
            available_bytes: Some(21_338_716 * KIB),
        })
    );
}

#[test]
fn reports_why_meminfo_is_malformed() {
    assert_eq!(
        parse_meminfo(&fixture("malformed/meminfo_no_memtotal.txt")),
        Err(ParseError::MissingField {
            what: "/proc/meminfo",
            field: "MemTotal",
        })
    );
    assert_eq!(
        parse_meminfo(&fixture("malformed/meminfo_bad_value.txt")),
        Err(ParseError::InvalidValue {
            what: "MemTotal",
            value: "lots kB".to_owned(),
            expected: "kB count",
        })
    );
    assert!(parse_meminfo("MemTotal: 18446744073709551615 kB").is_err());
}

#[test]
fn reports_why_cpuinfo_is_malformed() {
    assert_eq!(
        parse_cpuinfo(&fixture("malformed/cpuinfo_empty.txt")),
        Err(ParseError::Empty {
            what: "/proc/cpuinfo"
        })
    );
    assert_eq!(
        parse_cpuinfo("model name\t: Some CPU\n"),
        Err(ParseError::MissingField {
            what: "/proc/cpuinfo",
            field: "processor",
        })
    );
}

#[test]
fn unquotes_os_release_values() {
    assert_eq!(parse_os_release("NAME=Arch\n"), Ok("Arch".to_owned()));
    assert_eq!(parse_os_release("NAME='Alpine'\n"), Ok("Alpine".to_owned()));
    assert_eq!(
        parse_os_release(r#"PRETTY_NAME="A \"quoted\" OS""#),
        Ok(r#"A "quoted" OS"#.to_owned())
    );
    assert_eq!(
        parse_os_release(&fixture("malformed/os_release_no_name.txt")),
        Err(ParseError::MissingField {
            what: "os-release",
            field: "PRETTY_NAME or NAME",
        })
    );
}

#[test]
fn parses_two_nvidia_gpus_and_their_mean_use() {
    let gpus = parse_nvidia_smi(&fixture("linux/ryzen-2x4090/nvidia_smi.csv")).unwrap();
    let utilization: Vec<_> = gpus.iter().map(|gpu| gpu.utilization_percent).collect();
    assert_eq!(utilization, [Some(0.0), Some(100.0)]);
    assert_eq!(mean_utilization(&gpus), Some(50.0));
}

#[test]
fn parses_one_nvidia_gpu() {
    let gpus = parse_nvidia_smi(&fixture("linux/xeon-a100/nvidia_smi.csv")).unwrap();
    assert_eq!(
        gpus,
        [NvidiaGpu {
            name: "NVIDIA A100-SXM4-80GB".to_owned(),
            memory_bytes: 81_920 * MIB,
            utilization_percent: Some(37.0),
        }]
    );
}

#[test]
fn reads_unavailable_gpu_use_as_none() {
    let gpus = parse_nvidia_smi(&fixture("edge/nvidia_smi_utilization_unavailable.csv")).unwrap();
    assert_eq!(gpus.len(), 2);
    assert_eq!(gpus[0].name, "NVIDIA A100-SXM4-80GB MIG 3g.40gb");
    assert_eq!(mean_utilization(&gpus), None);
}

#[test]
fn reads_blank_nvidia_smi_output_as_no_gpu() {
    assert_eq!(parse_nvidia_smi("\n"), Ok(Vec::new()));
}

#[test]
fn keeps_a_comma_in_a_gpu_name() {
    let gpus = parse_nvidia_smi("NVIDIA RTX A6000, Ada, 49140, 5").unwrap();
    assert_eq!(gpus[0].name, "NVIDIA RTX A6000, Ada");
}

#[test]
fn reports_why_nvidia_smi_output_is_malformed() {
    let parse = |name: &str| parse_nvidia_smi(&fixture(&format!("malformed/{name}")));
    assert!(matches!(
        parse("nvidia_smi_driver_failure.csv"),
        Err(ParseError::InvalidValue {
            what: "nvidia-smi row",
            ..
        })
    ));
    assert!(matches!(
        parse("nvidia_smi_no_devices.csv"),
        Err(ParseError::InvalidValue {
            what: "nvidia-smi row",
            ..
        })
    ));
    assert_eq!(
        parse("nvidia_smi_bad_memory.csv"),
        Err(ParseError::InvalidValue {
            what: "nvidia-smi memory.total",
            value: "lots".to_owned(),
            expected: "MiB count",
        })
    );
    assert!(matches!(
        parse_nvidia_smi("GPU, 1024, 101"),
        Err(ParseError::AboveLimit { .. })
    ));
}
