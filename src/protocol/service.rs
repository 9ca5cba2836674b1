//! The NATS services protocol (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`, version 1), so tools such
//! as `nats micro ls` find and inspect workers. Wire shapes only; the worker answers them in
//! `worker::service`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The service name every worker answers to.
pub const SERVICE_NAME: &str = "mlx-worker";

/// The discovery verbs.
pub const VERBS: [&str; 3] = ["PING", "INFO", "STATS"];

/// The subjects a service with this id answers on: `$SRV.<VERB>`, `$SRV.<VERB>.<name>` and
/// `$SRV.<VERB>.<name>.<id>` for each verb.
pub fn subjects(id: &str) -> Vec<(String, &'static str)> {
    VERBS
        .iter()
        .flat_map(|verb| {
            [
                format!("$SRV.{verb}"),
                format!("$SRV.{verb}.{SERVICE_NAME}"),
                format!("$SRV.{verb}.{SERVICE_NAME}.{id}"),
            ]
            .into_iter()
            .map(move |s| (s, *verb))
        })
        .collect()
}

/// The fields every answer starts with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceHeader {
    /// The message type (`io.nats.micro.v1.ping_response`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// Service name.
    pub name: String,
    /// Instance id (the worker id).
    pub id: String,
    /// Service version.
    pub version: String,
    /// Free-form labels.
    pub metadata: BTreeMap<String, String>,
}

/// `io.nats.micro.v1.ping_response`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PingResponse {
    /// Who answers.
    #[serde(flatten)]
    pub header: ServiceHeader,
}

/// One endpoint of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointInfo {
    /// Endpoint name.
    pub name: String,
    /// Its subject.
    pub subject: String,
    /// Its queue group (empty when none).
    pub queue_group: String,
    /// Free-form labels.
    pub metadata: BTreeMap<String, String>,
}

/// `io.nats.micro.v1.info_response`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InfoResponse {
    /// Who answers.
    #[serde(flatten)]
    pub header: ServiceHeader,
    /// What the service does.
    pub description: String,
    /// Its endpoints.
    pub endpoints: Vec<EndpointInfo>,
    /// This worker's addition: the models it leaves out of its registrations because their
    /// load failed, by id (absent when there are none).
    #[serde(
        rename = "withdrawnModels",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub withdrawn_models: BTreeMap<String, WithdrawnModel>,
}

/// A model withdrawn after a failed load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WithdrawnModel {
    /// The last load's failure, as the engine told it (the host's paths left out).
    pub reason: String,
    /// When the last load failed, Unix milliseconds.
    pub failed_at: u64,
    /// Loads failed in a row.
    pub failures: u32,
    /// When it is retried, Unix milliseconds.
    pub retry_at: u64,
}

/// Figures of one endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointStats {
    /// Endpoint name.
    pub name: String,
    /// Its subject.
    pub subject: String,
    /// Its queue group.
    pub queue_group: String,
    /// Requests handled.
    pub num_requests: u64,
    /// Requests that ended with an error.
    pub num_errors: u64,
    /// The last error's text (empty when none).
    pub last_error: String,
    /// Total processing time, nanoseconds.
    pub processing_time: u64,
    /// Mean processing time, nanoseconds.
    pub average_processing_time: u64,
    /// The worker's load figures.
    pub data: serde_json::Value,
}

/// `io.nats.micro.v1.stats_response`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsResponse {
    /// Who answers.
    #[serde(flatten)]
    pub header: ServiceHeader,
    /// When the service started, RFC 3339 (UTC).
    pub started: String,
    /// Per-endpoint figures.
    pub endpoints: Vec<EndpointStats>,
}

/// Formats Unix milliseconds as RFC 3339 UTC (`2026-11-27T00:35:00.123Z`).
pub fn rfc3339(unix_millis: u64) -> String {
    let secs = unix_millis / 1000;
    let millis = unix_millis % 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_724_486_673), "2026-11-26T20:21:26.673Z");
    }

    #[test]
    fn a_worker_answers_nine_subjects() {
        let s = subjects("w-1");
        assert_eq!(s.len(), 9);
        assert!(s.contains(&("$SRV.STATS.mlx-worker.w-1".to_owned(), "STATS")));
        assert!(s.contains(&("$SRV.PING".to_owned(), "PING")));
    }
}
