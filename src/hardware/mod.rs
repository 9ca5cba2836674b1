//! What the host is and how busy it is: the [`HardwareProbe`] seam and its domain types; the
//! concurrency planned from them is `plan`'s.
//!
//! A probe answers two questions: the static [`HostProfile`] (asked once, at start, for the
//! registration) and a live [`HostSample`] (asked on every heartbeat). Production probes run a
//! command or read a file and hand the text to a pure parser, so every parser is tested on
//! captured output on any platform. Probes never fail: a missing source gives the documented
//! fallback value. This module does not know NATS; `worker` converts to the wire types.
//!
//! - [`mac`], [`linux`]: the production probes and the parsers of their tools and files;
//!   [`detect`] picks one. [`chip`] reads Apple chip names.

use std::sync::Arc;

use async_trait::async_trait;

pub mod chip;
mod command;
pub mod linux;
mod load;
pub mod mac;

#[cfg(test)]
pub(crate) mod tests;

pub use linux::LinuxProbe;
pub use mac::MacProbe;

/// Bytes in a GiB: memory figures on the wire and in the tier thresholds are in GiB.
const GIB: u64 = 1 << 30;

/// The chip name, CPU brand or OS version of a host whose source could not be read.
pub const UNKNOWN: &str = "Unknown";

/// Apple Silicon chip variant (the suffix of `M2 Max` …); `Base` elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChipVariant {
    /// The plain chip.
    Base,
    /// Pro.
    Pro,
    /// Max.
    Max,
    /// Ultra.
    Ultra,
}

impl ChipVariant {
    /// The name used on the wire (`Base`, `Pro`, `Max`, `Ultra`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChipVariant::Base => "Base",
            ChipVariant::Pro => "Pro",
            ChipVariant::Max => "Max",
            ChipVariant::Ultra => "Ultra",
        }
    }
}

/// The static description of the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostProfile {
    /// Chip name such as `M2-Max`, or `Unknown`.
    pub chip_model: String,
    /// Apple Silicon generation (1 for M1 …), or 0 off Apple Silicon.
    pub chip_generation: u32,
    /// Chip variant.
    pub variant: ChipVariant,
    /// CPU brand string as the system reports it.
    pub cpu_brand: String,
    /// Logical CPU cores.
    pub cpu_cores: u32,
    /// Performance cores (all cores on hosts without a split).
    pub performance_cores: u32,
    /// Efficiency cores.
    pub efficiency_cores: u32,
    /// GPU cores (Apple Silicon), or 0 when unknown.
    pub gpu_cores: u32,
    /// Discrete GPUs (NVIDIA on Linux), empty on Apple Silicon.
    pub gpus: Vec<GpuInfo>,
    /// Physical memory in bytes (unified memory on Apple Silicon).
    pub memory_bytes: u64,
    /// Metal version, when known.
    pub metal_version: Option<String>,
    /// Operating system name and version.
    pub os_version: String,
}

/// One discrete GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuInfo {
    /// Product name.
    pub name: String,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// A live reading of the host's load.
#[derive(Clone, Debug, PartialEq)]
pub struct HostSample {
    /// Host-wide CPU use since the previous sample, 0–100.
    pub cpu_usage_percent: f64,
    /// Memory in use, bytes.
    pub memory_used_bytes: u64,
    /// Physical memory, bytes.
    pub memory_total_bytes: u64,
    /// GPU use, 0–100, when the host can tell.
    pub gpu_utilization_percent: Option<f64>,
    /// Memory pressure, 0–1, when the host can tell.
    pub memory_pressure: Option<f64>,
}

/// Reads the host's profile and load.
#[async_trait]
pub trait HardwareProbe: Send + Sync + 'static {
    /// The static profile; called once at start. Never fails: sources that cannot be read
    /// give the documented fallbacks.
    async fn profile(&self) -> HostProfile;

    /// A live sample; called on every heartbeat, so it must be cheap.
    async fn sample(&self) -> HostSample;
}

impl HostProfile {
    /// Memory in whole GiB, rounded half up (JavaScript's `Math.round`): the wire's
    /// `unifiedMemoryGB` and the unit of the tier thresholds.
    pub fn memory_gb(&self) -> u64 {
        (self.memory_bytes + GIB / 2) / GIB
    }
}

impl HostSample {
    /// Memory in use in GiB, unrounded: the heartbeat's `memoryUsedGB`.
    pub fn memory_used_gb(&self) -> f64 {
        self.memory_used_bytes as f64 / GIB as f64
    }
}

/// What the operating system tells without any of the probe's tools: the last-resort values
/// for the CPU count and the memory size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCounts {
    /// Logical CPUs this process may use (`std::thread::available_parallelism`), at least 1.
    pub cpu_cores: u32,
    /// Physical memory in bytes as sysinfo reads it, 0 when it cannot.
    pub memory_bytes: u64,
}

/// Why a tool's output or a file's text could not be read as what it should be.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ParseError {
    /// The text is empty or blank.
    #[error("{what} is empty")]
    Empty {
        /// The source, such as `hw.memsize` or `/proc/cpuinfo`.
        what: &'static str,
    },
    /// A field the text must carry is missing.
    #[error("{what} has no {field}")]
    MissingField {
        /// The source.
        what: &'static str,
        /// The field or key that is missing.
        field: &'static str,
    },
    /// A value does not have the expected form.
    #[error("{what} value {value:?} is not a valid {expected}")]
    InvalidValue {
        /// The source.
        what: &'static str,
        /// The offending value, shortened to [`ParseError::VALUE_CHARS_MAX`] characters.
        value: String,
        /// What the value should have been, such as `count` or `percentage`.
        expected: &'static str,
    },
    /// A number lies outside the range its field allows.
    #[error("{what} is {value}, limit {limit}")]
    AboveLimit {
        /// The source.
        what: &'static str,
        /// The value read.
        value: f64,
        /// The largest value allowed.
        limit: f64,
    },
    /// The text is not valid JSON.
    #[error("{what} is not valid json: {reason}")]
    InvalidJson {
        /// The source.
        what: &'static str,
        /// The JSON parser's message.
        reason: String,
    },
    /// A brand string that names no Apple Silicon chip.
    #[error("brand string {brand:?} names no apple silicon chip")]
    UnknownChip {
        /// The brand string, shortened to [`ParseError::VALUE_CHARS_MAX`] characters.
        brand: String,
    },
}

impl ParseError {
    /// Characters of an offending value an error keeps, so a huge output cannot make a huge
    /// log line.
    pub const VALUE_CHARS_MAX: usize = 64;

    /// A [`ParseError::InvalidValue`] quoting at most [`ParseError::VALUE_CHARS_MAX`]
    /// characters of `value`.
    fn invalid(what: &'static str, value: &str, expected: &'static str) -> ParseError {
        ParseError::InvalidValue {
            what,
            value: value.chars().take(ParseError::VALUE_CHARS_MAX).collect(),
            expected,
        }
    }
}

/// Why a tool could not be run or a file could not be read. Probes log it and use the
/// documented fallback; it never reaches the worker.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The program is not installed (or not on `PATH`).
    #[error("{program} is not installed")]
    Absent {
        /// The program.
        program: &'static str,
    },
    /// The program exists but could not be started, or its output could not be read.
    #[error("could not run {program}: {cause}")]
    Io {
        /// The program.
        program: &'static str,
        /// The operating system's error.
        cause: std::io::Error,
    },
    /// The program ran longer than allowed and was killed.
    #[error("{program} did not finish within {timeout:?}")]
    TimedOut {
        /// The program.
        program: &'static str,
        /// The time it was allowed.
        timeout: std::time::Duration,
    },
    /// The program printed more than allowed.
    #[error("{program} printed more than {limit} bytes")]
    OutputTooLarge {
        /// The program.
        program: &'static str,
        /// The most bytes of output read.
        limit: usize,
    },
    /// The program exited unsuccessfully.
    #[error("{program} exited with {status}")]
    Failed {
        /// The program.
        program: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// The output is not UTF-8.
    #[error("{program} printed text that is not utf-8")]
    NotUtf8 {
        /// The program or the file.
        program: &'static str,
    },
    /// A file could not be read.
    #[error("could not read {path}: {cause}")]
    File {
        /// The file.
        path: &'static str,
        /// The operating system's error.
        cause: std::io::Error,
    },
}

/// The production probe for this platform: [`MacProbe`] on macOS, [`LinuxProbe`] elsewhere
/// (whose file sources are simply missing off Linux, giving its fallbacks).
pub fn detect() -> Arc<dyn HardwareProbe> {
    if cfg!(target_os = "macos") {
        Arc::new(MacProbe::new())
    } else {
        Arc::new(LinuxProbe::new())
    }
}

/// Parses `text` when there is one. A parse error is logged and reads as `None`, so the
/// caller applies its documented fallback.
fn parsed<T>(text: Option<&str>, parse: impl FnOnce(&str) -> Result<T, ParseError>) -> Option<T> {
    match parse(text?) {
        Ok(value) => Some(value),
        Err(cause) => {
            tracing::debug!(%cause, "unreadable probe source, using fallback");
            None
        }
    }
}

/// Reads a percentage in 0–100 (`37`, `4.5`).
fn percentage(what: &'static str, raw: &str) -> Result<f64, ParseError> {
    let value: f64 = raw
        .trim()
        .parse()
        .map_err(|_| ParseError::invalid(what, raw, "percentage"))?;
    if value.is_nan() || value < 0.0 {
        return Err(ParseError::invalid(what, raw, "percentage"));
    }
    if value > 100.0 {
        return Err(ParseError::AboveLimit {
            what,
            value,
            limit: 100.0,
        });
    }
    Ok(value)
}
