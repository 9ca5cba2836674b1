//! The Linux probe ([`LinuxProbe`]) and the pure parsers of what it reads: `/proc/cpuinfo`,
//! `/proc/meminfo`, `/etc/os-release`, `/proc/sys/kernel/osrelease` and the CSV of
//! `nvidia-smi`.
//!
//! A Linux host has no Apple chip: its profile always reads chip `Unknown`, generation 0,
//! Base, 0 GPU cores, every core a performance core and no Metal version. Each source falls
//! back on its own:
//!
//! | source | fallback |
//! |---|---|
//! | `/proc/cpuinfo` processors | [`HostCounts::cpu_cores`] |
//! | `/proc/cpuinfo` `model name` (absent on ARM) | CPU brand `Unknown` |
//! | `/proc/meminfo` `MemTotal` | [`HostCounts::memory_bytes`] |
//! | `/etc/os-release` (then `/usr/lib/os-release`) | the OS version is the kernel's alone |
//! | `/proc/sys/kernel/osrelease` | the OS version is the distribution's alone, else `Unknown` |
//! | `nvidia-smi` missing or failing | no GPUs, no GPU use |
//!
//! Memory pressure is not read on Linux (`None` in every sample).

use async_trait::async_trait;
use tokio::io::AsyncReadExt;

use super::command::{PROFILE_COMMAND_TIMEOUT, SAMPLE_COMMAND_TIMEOUT, Tool};
use super::load::LoadMeter;
use super::{
    ChipVariant, GpuInfo, HardwareProbe, HostCounts, HostProfile, HostSample, ParseError,
    ProbeError, UNKNOWN, parsed, percentage,
};

/// Bytes read from one file at most; `/proc/cpuinfo` of a 256-thread host is ~400 KiB.
const FILE_BYTES_MAX: u64 = 4 << 20;

/// Bytes in the MiB that `nvidia-smi` reports memory in.
const MIB: u64 = 1 << 20;

/// Reads a Linux host through procfs, sysinfo and, when installed, `nvidia-smi`.
#[derive(Debug)]
pub struct LinuxProbe {
    /// CPU and memory load; also the fallbacks of the profile.
    load: LoadMeter,
    /// `nvidia-smi --query-gpu=…`: GPUs at start, their use on every sample. A host without
    /// it costs one failed spawn, then none.
    nvidia_smi: Tool,
}

impl LinuxProbe {
    /// A probe that has read nothing yet.
    pub fn new() -> LinuxProbe {
        LinuxProbe {
            load: LoadMeter::new(),
            nvidia_smi: Tool::new(
                "nvidia-smi",
                &[
                    "--query-gpu=name,memory.total,utilization.gpu",
                    "--format=csv,noheader,nounits",
                ],
            ),
        }
    }
}

impl Default for LinuxProbe {
    fn default() -> Self {
        LinuxProbe::new()
    }
}

#[async_trait]
impl HardwareProbe for LinuxProbe {
    async fn profile(&self) -> HostProfile {
        let sources = LinuxSources::read(&self.nvidia_smi).await;
        linux_profile(&sources, self.load.host_counts())
    }

    async fn sample(&self) -> HostSample {
        let load = self.load.read();
        let gpus = self.nvidia_smi.run(SAMPLE_COMMAND_TIMEOUT).await;
        HostSample {
            cpu_usage_percent: load.cpu_usage_percent,
            memory_used_bytes: load.memory_used_bytes,
            memory_total_bytes: load.memory_total_bytes,
            gpu_utilization_percent: parsed(gpus.ok().as_deref(), parse_nvidia_smi)
                .and_then(|gpus| mean_utilization(&gpus)),
            memory_pressure: None,
        }
    }
}

/// The raw texts a Linux profile is built from; `None` where a file or tool could not be read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinuxSources {
    /// `/proc/cpuinfo`.
    pub cpuinfo: Option<String>,
    /// `/proc/meminfo`.
    pub meminfo: Option<String>,
    /// `/etc/os-release`, else `/usr/lib/os-release`.
    pub os_release: Option<String>,
    /// `/proc/sys/kernel/osrelease`.
    pub kernel_release: Option<String>,
    /// `nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv,noheader,nounits`.
    pub nvidia_smi: Option<String>,
}

impl LinuxSources {
    /// Reads every source at once; `nvidia-smi` within [`PROFILE_COMMAND_TIMEOUT`].
    async fn read(nvidia_smi: &Tool) -> LinuxSources {
        let (cpuinfo, meminfo, os_release, kernel_release, nvidia_smi) = tokio::join!(
            read_file("/proc/cpuinfo"),
            read_file("/proc/meminfo"),
            os_release(),
            read_file("/proc/sys/kernel/osrelease"),
            nvidia_smi.run(PROFILE_COMMAND_TIMEOUT),
        );
        LinuxSources {
            cpuinfo,
            meminfo,
            os_release,
            kernel_release,
            nvidia_smi: nvidia_smi
                .inspect_err(|cause| tracing::debug!(%cause, "no nvidia gpus"))
                .ok(),
        }
    }
}

/// `/etc/os-release`, else `/usr/lib/os-release` (the os-release(5) search order).
async fn os_release() -> Option<String> {
    match read_file("/etc/os-release").await {
        Some(text) => Some(text),
        None => read_file("/usr/lib/os-release").await,
    }
}

/// The first [`FILE_BYTES_MAX`] bytes of a text file, or `None` (logged) when it cannot be
/// read.
async fn read_file(path: &'static str) -> Option<String> {
    let read = async {
        let file = tokio::fs::File::open(path).await?;
        let mut text = String::new();
        file.take(FILE_BYTES_MAX).read_to_string(&mut text).await?;
        Ok(text)
    };
    read.await
        .map_err(|cause| ProbeError::File { path, cause })
        .inspect_err(|cause| tracing::debug!(%cause, "profile source unavailable, using fallback"))
        .ok()
}

/// Builds the profile from the texts read, each missing or unreadable one replaced by its
/// fallback (the table in the module documentation).
pub fn linux_profile(sources: &LinuxSources, counts: HostCounts) -> HostProfile {
    let cpu = parsed(sources.cpuinfo.as_deref(), parse_cpuinfo);
    let cpu_cores = cpu
        .as_ref()
        .map_or(counts.cpu_cores, |cpu| cpu.logical_cpus);
    let gpus = parsed(sources.nvidia_smi.as_deref(), parse_nvidia_smi).unwrap_or_default();
    HostProfile {
        chip_model: UNKNOWN.to_owned(),
        chip_generation: 0,
        variant: ChipVariant::Base,
        cpu_brand: cpu
            .and_then(|cpu| cpu.model_name)
            .unwrap_or_else(|| UNKNOWN.to_owned()),
        cpu_cores,
        performance_cores: cpu_cores,
        efficiency_cores: 0,
        gpu_cores: 0,
        gpus: gpus
            .into_iter()
            .map(|gpu| GpuInfo {
                name: gpu.name,
                memory_bytes: gpu.memory_bytes,
            })
            .collect(),
        memory_bytes: parsed(sources.meminfo.as_deref(), parse_meminfo)
            .map_or(counts.memory_bytes, |meminfo| meminfo.total_bytes),
        metal_version: None,
        os_version: os_version(
            parsed(sources.os_release.as_deref(), parse_os_release),
            parsed(sources.kernel_release.as_deref(), parse_kernel_release),
        ),
    }
}

/// `Ubuntu 24.04.1 LTS, Linux 6.8.0-45-generic`, or whichever half is known.
fn os_version(distribution: Option<String>, kernel: Option<String>) -> String {
    match (distribution, kernel) {
        (Some(distribution), Some(kernel)) => format!("{distribution}, Linux {kernel}"),
        (Some(distribution), None) => distribution,
        (None, Some(kernel)) => format!("Linux {kernel}"),
        (None, None) => UNKNOWN.to_owned(),
    }
}

/// What `/proc/cpuinfo` tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuInfo {
    /// The first `model name`, absent on ARM hosts.
    pub model_name: Option<String>,
    /// The number of `processor` entries: logical CPUs.
    pub logical_cpus: u32,
}

/// Reads `/proc/cpuinfo`.
///
/// # Errors
///
/// [`ParseError::Empty`] for an empty file, [`ParseError::MissingField`] when it lists no
/// `processor`.
pub fn parse_cpuinfo(text: &str) -> Result<CpuInfo, ParseError> {
    const WHAT: &str = "/proc/cpuinfo";
    if text.trim().is_empty() {
        return Err(ParseError::Empty { what: WHAT });
    }
    let mut logical_cpus: u32 = 0;
    let mut model_name = None;
    for (key, value) in text.lines().filter_map(|line| line.split_once(':')) {
        match key.trim() {
            "processor" => logical_cpus = logical_cpus.saturating_add(1),
            "model name" if model_name.is_none() && !value.trim().is_empty() => {
                model_name = Some(value.trim().to_owned());
            }
            _ => {}
        }
    }
    if logical_cpus == 0 {
        return Err(ParseError::MissingField {
            what: WHAT,
            field: "processor",
        });
    }
    Ok(CpuInfo {
        model_name,
        logical_cpus,
    })
}

/// What `/proc/meminfo` tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meminfo {
    /// `MemTotal`, bytes.
    pub total_bytes: u64,
    /// `MemAvailable`, bytes; absent before Linux 3.14.
    pub available_bytes: Option<u64>,
}

/// Reads `/proc/meminfo` (values in `kB`, which are KiB).
///
/// # Errors
///
/// [`ParseError::MissingField`] without `MemTotal`, [`ParseError::InvalidValue`] when
/// `MemTotal` or `MemAvailable` is not a `kB` count that fits in bytes.
pub fn parse_meminfo(text: &str) -> Result<Meminfo, ParseError> {
    let field = |name: &str| {
        text.lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(key, _)| key.trim() == name)
            .map(|(_, value)| value)
    };
    let total = field("MemTotal").ok_or(ParseError::MissingField {
        what: "/proc/meminfo",
        field: "MemTotal",
    })?;
    Ok(Meminfo {
        total_bytes: kib_to_bytes("MemTotal", total)?,
        available_bytes: field("MemAvailable")
            .map(|value| kib_to_bytes("MemAvailable", value))
            .transpose()?,
    })
}

/// A meminfo value (`16069160 kB`) in bytes.
fn kib_to_bytes(what: &'static str, value: &str) -> Result<u64, ParseError> {
    let value = value.trim();
    value
        .strip_suffix("kB")
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .and_then(|kib| kib.checked_mul(1024))
        .ok_or_else(|| ParseError::invalid(what, value, "kB count"))
}

/// Reads os-release(5): `PRETTY_NAME`, else `NAME`, unquoted (`Ubuntu 24.04.1 LTS`).
///
/// # Errors
///
/// [`ParseError::MissingField`] when neither is set to a non-empty value.
pub fn parse_os_release(text: &str) -> Result<String, ParseError> {
    let field = |name: &str| {
        text.lines()
            .filter_map(|line| line.trim().split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| unquote(value))
            .filter(|value| !value.is_empty())
    };
    field("PRETTY_NAME")
        .or_else(|| field("NAME"))
        .ok_or(ParseError::MissingField {
            what: "os-release",
            field: "PRETTY_NAME or NAME",
        })
}

/// An os-release value without its enclosing quotes and with its backslash escapes resolved.
fn unquote(value: &str) -> String {
    let value = value.trim();
    let inner = ['"', '\'']
        .into_iter()
        .find_map(|quote| value.strip_prefix(quote)?.strip_suffix(quote))
        .unwrap_or(value);
    let mut unescaped = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => unescaped.extend(chars.next()),
            c => unescaped.push(c),
        }
    }
    unescaped
}

/// Reads `/proc/sys/kernel/osrelease` (`6.8.0-45-generic`).
///
/// # Errors
///
/// [`ParseError::Empty`] for a blank file, [`ParseError::InvalidValue`] for one holding more
/// than one word.
pub fn parse_kernel_release(text: &str) -> Result<String, ParseError> {
    const WHAT: &str = "/proc/sys/kernel/osrelease";
    let release = text.trim();
    if release.is_empty() {
        return Err(ParseError::Empty { what: WHAT });
    }
    if release.contains(char::is_whitespace) {
        return Err(ParseError::invalid(WHAT, release, "kernel release"));
    }
    Ok(release.to_owned())
}

/// One NVIDIA GPU as `nvidia-smi` lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct NvidiaGpu {
    /// Product name (`NVIDIA A100-SXM4-80GB`).
    pub name: String,
    /// `memory.total`, bytes.
    pub memory_bytes: u64,
    /// `utilization.gpu`, 0–100; `None` when it reads `[N/A]` or `[Not Supported]` (MIG
    /// instances, some virtual GPUs).
    pub utilization_percent: Option<f64>,
}

/// Reads the output of `nvidia-smi --query-gpu=name,memory.total,utilization.gpu
/// --format=csv,noheader,nounits`: one `name, MiB, percent` row per GPU. Blank output is no
/// GPU. The name is everything before the last two commas, so a comma in it is harmless.
///
/// # Errors
///
/// [`ParseError::InvalidValue`] for a row without three fields (such as the driver's "NVIDIA-SMI
/// has failed …" or "No devices were found"), a memory that is not a MiB count, or a
/// utilisation that is neither a percentage nor bracketed;
/// [`ParseError::AboveLimit`] for a utilisation over 100.
pub fn parse_nvidia_smi(text: &str) -> Result<Vec<NvidiaGpu>, ParseError> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(parse_nvidia_smi_row)
        .collect()
}

/// One `name, MiB, percent` row.
fn parse_nvidia_smi_row(line: &str) -> Result<NvidiaGpu, ParseError> {
    const WHAT: &str = "nvidia-smi row";
    let mut fields = line.rsplitn(3, ',');
    let (Some(utilization), Some(memory), Some(name)) =
        (fields.next(), fields.next(), fields.next())
    else {
        return Err(ParseError::invalid(
            WHAT,
            line,
            "name, memory, utilization row",
        ));
    };
    let memory = memory.trim();
    let memory_bytes = memory
        .parse::<u64>()
        .ok()
        .and_then(|mib| mib.checked_mul(MIB))
        .ok_or_else(|| ParseError::invalid("nvidia-smi memory.total", memory, "MiB count"))?;
    let utilization = utilization.trim();
    let utilization_percent = if utilization.starts_with('[') {
        None
    } else {
        Some(percentage("nvidia-smi utilization.gpu", utilization)?)
    };
    Ok(NvidiaGpu {
        name: name.trim().to_owned(),
        memory_bytes,
        utilization_percent,
    })
}

/// Mean use of the GPUs that report it: the host's GPU use. `None` when none does.
pub fn mean_utilization(gpus: &[NvidiaGpu]) -> Option<f64> {
    let reported: Vec<f64> = gpus
        .iter()
        .filter_map(|gpu| gpu.utilization_percent)
        .collect();
    if reported.is_empty() {
        return None;
    }
    Some(reported.iter().sum::<f64>() / reported.len() as f64)
}

#[cfg(test)]
mod tests;
