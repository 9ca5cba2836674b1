//! The macOS probe ([`MacProbe`]) and the pure parsers of the macOS tools it runs: `sysctl`,
//! `sw_vers`, `system_profiler`, `ioreg` and `memory_pressure`.
//!
//! Compiled on every platform: the parsers are tested on captured output anywhere, and on
//! another OS every tool is simply missing, which gives the fallbacks. Each source falls back
//! on its own, to the value the TypeScript detector's fallback profile uses:
//!
//! | source | fallback |
//! |---|---|
//! | `machdep.cpu.brand_string` unreadable | chip `Unknown`, generation 1, Base (the TS fallback profile assumes Apple Silicon) |
//! | brand string names no Apple chip (Intel Mac) | chip `Unknown`, generation 0, Base |
//! | `sppci_cores` missing | the estimate from the brand string ([`AppleChip::estimated_gpu_cores`]), else 8 |
//! | `hw.logicalcpu` | [`HostCounts::cpu_cores`] |
//! | `hw.perflevel0.logicalcpu` | 4 performance cores |
//! | `hw.perflevel1.logicalcpu` | all cores minus the performance cores |
//! | `hw.memsize` | [`HostCounts::memory_bytes`] |
//! | `spdisplays_mtlgpufamilysupport` | no Metal version (`Unknown` on the wire) |
//! | `sw_vers -productVersion` | `Unknown` |
//! | `ioreg` / `memory_pressure` (per sample) | no GPU use / no memory pressure |

use async_trait::async_trait;
use serde_json::Value;

use super::chip::{AppleChip, parse_brand_string};
use super::command::{self, PROFILE_COMMAND_TIMEOUT, SAMPLE_COMMAND_TIMEOUT, Tool};
use super::load::LoadMeter;
use super::{
    ChipVariant, HardwareProbe, HostCounts, HostProfile, HostSample, ParseError, UNKNOWN, parsed,
    percentage,
};

/// GPU cores assumed when neither `system_profiler` nor the brand string tells.
const FALLBACK_GPU_CORES: u32 = 8;

/// Performance cores assumed when `hw.perflevel0.logicalcpu` cannot be read.
const FALLBACK_PERFORMANCE_CORES: u32 = 4;

/// Reads an Apple Silicon Mac through its command-line tools and sysinfo.
#[derive(Debug)]
pub struct MacProbe {
    /// CPU and memory load; also the memory fallback of the profile.
    load: LoadMeter,
    /// `ioreg -r -d 1 -w 0 -c IOAccelerator`: GPU use, run on every sample.
    ioreg: Tool,
    /// `memory_pressure -Q`: share of free memory, run on every sample.
    memory_pressure: Tool,
}

impl MacProbe {
    /// A probe that has run nothing yet.
    pub fn new() -> MacProbe {
        MacProbe {
            load: LoadMeter::new(),
            ioreg: Tool::new(
                "ioreg",
                &["-r", "-d", "1", "-w", "0", "-c", "IOAccelerator"],
            ),
            memory_pressure: Tool::new("memory_pressure", &["-Q"]),
        }
    }
}

impl Default for MacProbe {
    fn default() -> Self {
        MacProbe::new()
    }
}

#[async_trait]
impl HardwareProbe for MacProbe {
    async fn profile(&self) -> HostProfile {
        let sources = MacSources::read().await;
        mac_profile(&sources, self.load.host_counts())
    }

    async fn sample(&self) -> HostSample {
        let load = self.load.read();
        let (ioreg, memory_pressure) = tokio::join!(
            self.ioreg.run(SAMPLE_COMMAND_TIMEOUT),
            self.memory_pressure.run(SAMPLE_COMMAND_TIMEOUT),
        );
        HostSample {
            cpu_usage_percent: load.cpu_usage_percent,
            memory_used_bytes: load.memory_used_bytes,
            memory_total_bytes: load.memory_total_bytes,
            gpu_utilization_percent: parsed(ioreg.ok().as_deref(), parse_ioreg_gpu_utilization),
            memory_pressure: parsed(memory_pressure.ok().as_deref(), parse_memory_pressure),
        }
    }
}

/// The raw outputs a macOS profile is built from; `None` where the tool failed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MacSources {
    /// `sysctl -n machdep.cpu.brand_string`.
    pub brand_string: Option<String>,
    /// `sysctl -n hw.memsize`.
    pub memsize: Option<String>,
    /// `sysctl -n hw.logicalcpu`.
    pub logical_cpus: Option<String>,
    /// `sysctl -n hw.perflevel0.logicalcpu` (performance cores).
    pub performance_cpus: Option<String>,
    /// `sysctl -n hw.perflevel1.logicalcpu` (efficiency cores).
    pub efficiency_cpus: Option<String>,
    /// `sw_vers -productVersion`.
    pub product_version: Option<String>,
    /// `system_profiler SPDisplaysDataType -json`.
    pub displays_json: Option<String>,
}

impl MacSources {
    /// Runs every tool at once, each within [`PROFILE_COMMAND_TIMEOUT`].
    async fn read() -> MacSources {
        let (brand_string, memsize, logical_cpus, performance_cpus, efficiency_cpus) = tokio::join!(
            sysctl("machdep.cpu.brand_string"),
            sysctl("hw.memsize"),
            sysctl("hw.logicalcpu"),
            sysctl("hw.perflevel0.logicalcpu"),
            sysctl("hw.perflevel1.logicalcpu"),
        );
        let (product_version, displays_json) = tokio::join!(
            output("sw_vers", &["-productVersion"]),
            output("system_profiler", &["SPDisplaysDataType", "-json"]),
        );
        MacSources {
            brand_string,
            memsize,
            logical_cpus,
            performance_cpus,
            efficiency_cpus,
            product_version,
            displays_json,
        }
    }
}

/// `sysctl -n <key>`, or `None` when it fails.
async fn sysctl(key: &'static str) -> Option<String> {
    output("sysctl", &["-n", key]).await
}

/// A profile tool's output, or `None` (logged) when it fails.
async fn output(program: &'static str, args: &[&str]) -> Option<String> {
    command::run(program, args, PROFILE_COMMAND_TIMEOUT)
        .await
        .inspect_err(|cause| tracing::debug!(%cause, "profile source unavailable, using fallback"))
        .ok()
}

/// Builds the profile from the tools' outputs, each missing or unreadable one replaced by its
/// fallback (the table in the module documentation).
pub fn mac_profile(sources: &MacSources, counts: HostCounts) -> HostProfile {
    let identity = Identity::from_brand_string(sources.brand_string.as_deref());
    let displays = parsed(sources.displays_json.as_deref(), parse_displays_json);
    let (gpu_cores, metal_version) = displays
        .map(|displays| (displays.gpu_cores, displays.metal_version))
        .unwrap_or_default();
    let cpu_cores = parsed(sources.logical_cpus.as_deref(), |text| {
        parse_sysctl_value(text, "hw.logicalcpu")
    })
    .unwrap_or(counts.cpu_cores);
    let performance_cores = parsed(sources.performance_cpus.as_deref(), |text| {
        parse_sysctl_value(text, "hw.perflevel0.logicalcpu")
    })
    .unwrap_or(FALLBACK_PERFORMANCE_CORES);
    let efficiency_cores = parsed(sources.efficiency_cpus.as_deref(), |text| {
        parse_sysctl_value(text, "hw.perflevel1.logicalcpu")
    })
    .unwrap_or(cpu_cores.saturating_sub(performance_cores));
    HostProfile {
        chip_model: identity.chip_model,
        chip_generation: identity.generation,
        variant: identity.variant,
        cpu_brand: identity.cpu_brand,
        cpu_cores,
        performance_cores,
        efficiency_cores,
        gpu_cores: gpu_cores
            .or(identity.estimated_gpu_cores)
            .unwrap_or(FALLBACK_GPU_CORES),
        gpus: Vec::new(),
        memory_bytes: parsed(sources.memsize.as_deref(), |text| {
            parse_sysctl_value(text, "hw.memsize")
        })
        .unwrap_or(counts.memory_bytes),
        metal_version,
        os_version: parsed(sources.product_version.as_deref(), parse_product_version)
            .unwrap_or_else(|| UNKNOWN.to_owned()),
    }
}

/// What the brand string tells, fallbacks applied.
struct Identity {
    chip_model: String,
    generation: u32,
    variant: ChipVariant,
    cpu_brand: String,
    estimated_gpu_cores: Option<u32>,
}

impl Identity {
    /// Reads the brand string, or applies the fallbacks of an unreadable (generation 1) or
    /// unrecognised (generation 0) one.
    fn from_brand_string(brand: Option<&str>) -> Identity {
        let Some(brand) = brand else {
            return Identity::unknown(1, UNKNOWN);
        };
        match parse_brand_string(brand) {
            Ok(chip) => Identity::apple(chip, brand.trim()),
            Err(cause) => {
                tracing::debug!(%cause, "not apple silicon, chip reported as unknown");
                Identity::unknown(0, brand.trim())
            }
        }
    }

    fn apple(chip: AppleChip, brand: &str) -> Identity {
        Identity {
            chip_model: chip.model_name(),
            generation: chip.generation,
            variant: chip.variant,
            cpu_brand: brand.to_owned(),
            estimated_gpu_cores: chip.estimated_gpu_cores(),
        }
    }

    fn unknown(generation: u32, brand: &str) -> Identity {
        Identity {
            chip_model: UNKNOWN.to_owned(),
            generation,
            variant: ChipVariant::Base,
            cpu_brand: if brand.is_empty() { UNKNOWN } else { brand }.to_owned(),
            estimated_gpu_cores: None,
        }
    }
}

/// Reads a `sysctl -n <key>` value as a number.
///
/// # Errors
///
/// [`ParseError::Empty`] for blank output (`sysctl` prints an unknown key's error on standard
/// error), [`ParseError::InvalidValue`] for anything but a number that fits `T`.
pub fn parse_sysctl_value<T: std::str::FromStr>(
    output: &str,
    key: &'static str,
) -> Result<T, ParseError> {
    let value = output.trim();
    if value.is_empty() {
        return Err(ParseError::Empty { what: key });
    }
    value
        .parse()
        .map_err(|_| ParseError::invalid(key, value, "number"))
}

/// Reads `sw_vers -productVersion` (`14.6.1`) as the profile's OS version (`macOS 14.6.1`).
///
/// # Errors
///
/// [`ParseError::Empty`] for blank output, [`ParseError::InvalidValue`] unless the version is
/// digits and dots starting with a digit.
pub fn parse_product_version(output: &str) -> Result<String, ParseError> {
    const WHAT: &str = "sw_vers -productVersion";
    let version = output.trim();
    if version.is_empty() {
        return Err(ParseError::Empty { what: WHAT });
    }
    let well_formed = version.starts_with(|c: char| c.is_ascii_digit())
        && version.chars().all(|c| c.is_ascii_digit() || c == '.');
    if !well_formed {
        return Err(ParseError::invalid(WHAT, version, "macOS version"));
    }
    Ok(format!("macOS {version}"))
}

/// What `system_profiler SPDisplaysDataType -json` tells about the GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Displays {
    /// `sppci_cores` of the first GPU that reports it (Apple GPUs do; Intel and AMD do not).
    pub gpu_cores: Option<u32>,
    /// `spdisplays_mtlgpufamilysupport` of the first GPU that reports it, as `Metal 3`.
    pub metal_version: Option<String>,
}

/// Reads `system_profiler SPDisplaysDataType -json`.
///
/// A GPU list without `sppci_cores` or without a Metal entry (a virtual machine, an Intel
/// Mac) is not an error: those fields are `None`.
///
/// # Errors
///
/// [`ParseError::InvalidJson`] for text that is not JSON, [`ParseError::MissingField`] when
/// there is no `SPDisplaysDataType` array, [`ParseError::InvalidValue`] when `sppci_cores` is
/// not a count.
pub fn parse_displays_json(output: &str) -> Result<Displays, ParseError> {
    const WHAT: &str = "system_profiler SPDisplaysDataType";
    let json: Value = serde_json::from_str(output).map_err(|cause| ParseError::InvalidJson {
        what: WHAT,
        reason: cause.to_string(),
    })?;
    let gpus = json
        .get("SPDisplaysDataType")
        .and_then(Value::as_array)
        .ok_or(ParseError::MissingField {
            what: WHAT,
            field: "SPDisplaysDataType array",
        })?;
    let gpu_cores = gpus
        .iter()
        .find_map(|gpu| gpu.get("sppci_cores"))
        .map(gpu_core_count)
        .transpose()?;
    let metal_version = gpus
        .iter()
        .find_map(|gpu| gpu.get("spdisplays_mtlgpufamilysupport")?.as_str())
        .map(metal_version);
    Ok(Displays {
        gpu_cores,
        metal_version,
    })
}

/// `sppci_cores`, a string (`"38"`) in every macOS seen, or a number.
fn gpu_core_count(value: &Value) -> Result<u32, ParseError> {
    let count = match value {
        Value::String(text) => text.trim().parse().ok(),
        Value::Number(number) => number.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    };
    count.ok_or_else(|| ParseError::invalid("sppci_cores", &value.to_string(), "count"))
}

/// `spdisplays_metal3` → `Metal 3`; any other value loses its `spdisplays_` prefix only.
fn metal_version(value: &str) -> String {
    let name = value.strip_prefix("spdisplays_").unwrap_or(value);
    match name.strip_prefix("metal") {
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            format!("Metal {digits}")
        }
        _ => name.to_owned(),
    }
}

/// Reads GPU use from `ioreg -r -d 1 -w 0 -c IOAccelerator`: the `"Device Utilization %"` of
/// each accelerator's `PerformanceStatistics` line, the busiest if there are several (an
/// Intel Mac's integrated and discrete GPUs).
///
/// # Errors
///
/// [`ParseError::Empty`] for blank output (no accelerator), [`ParseError::MissingField`] when
/// no statistics or no utilisation is listed, [`ParseError::InvalidValue`] or
/// [`ParseError::AboveLimit`] for a value that is not a percentage.
pub fn parse_ioreg_gpu_utilization(output: &str) -> Result<f64, ParseError> {
    const WHAT: &str = "ioreg IOAccelerator";
    const STATISTICS: &str = "\"PerformanceStatistics\" = {";
    const UTILIZATION: &str = "\"Device Utilization %\"=";
    if output.trim().is_empty() {
        return Err(ParseError::Empty { what: WHAT });
    }
    let statistics: Vec<&str> = output
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix(STATISTICS))
        .collect();
    if statistics.is_empty() {
        return Err(ParseError::MissingField {
            what: WHAT,
            field: "PerformanceStatistics",
        });
    }
    let mut busiest: Option<f64> = None;
    for raw in statistics.iter().filter_map(|stats| {
        let (_, rest) = stats.split_once(UTILIZATION)?;
        rest.split([',', '}']).next()
    }) {
        let utilization = percentage("Device Utilization %", raw)?;
        busiest = Some(busiest.map_or(utilization, |max| max.max(utilization)));
    }
    busiest.ok_or(ParseError::MissingField {
        what: WHAT,
        field: "Device Utilization %",
    })
}

/// Reads `memory_pressure -Q` (`System-wide memory free percentage: 57%`) as memory pressure
/// in 0–1: the share of memory that is not free (0.43 here).
///
/// # Errors
///
/// [`ParseError::MissingField`] without the free-percentage line, [`ParseError::InvalidValue`]
/// or [`ParseError::AboveLimit`] when it holds no percentage.
pub fn parse_memory_pressure(output: &str) -> Result<f64, ParseError> {
    const PREFIX: &str = "System-wide memory free percentage:";
    let line = output
        .lines()
        .find_map(|line| line.trim().strip_prefix(PREFIX))
        .ok_or(ParseError::MissingField {
            what: "memory_pressure -Q",
            field: "free percentage",
        })?;
    let value = line.trim();
    let free = percentage(
        "memory free percentage",
        value.strip_suffix('%').unwrap_or(value),
    )?;
    Ok((100.0 - free) / 100.0)
}

#[cfg(test)]
mod tests;
