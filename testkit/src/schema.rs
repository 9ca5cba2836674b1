//! The existing controller's schema of a heartbeat, as a check of a received message: what
//! its `WorkerHeartbeat` schema requires of each field it knows (type, range, format), and
//! where a worker's extensions may go.
//!
//! The schema's objects let unknown fields through (they are stripped, not refused). The
//! controller keeps the `metrics` object whole, as sent, and takes the top level field by
//! field; so the worker's extensions belong inside `metrics`, where the existing ones are, and
//! the check refuses any other top-level field.

use serde_json::{Map, Value};

/// Checks `heartbeat` against the controller's schema; the first violation, named by its path,
/// otherwise.
pub fn check_heartbeat(heartbeat: &Value) -> Result<(), String> {
    let top = object(heartbeat, "the heartbeat")?;
    for key in top.keys() {
        if !["workerId", "status", "metrics", "timestamp"].contains(&key.as_str()) {
            return Err(format!(
                "{key}: not in the schema; extensions go inside metrics"
            ));
        }
    }
    let id = string(top, "workerId")?;
    if !is_uuid(id) {
        return Err(format!("workerId: {id:?} is not a UUID"));
    }
    let status = string(top, "status")?;
    if !["online", "offline", "degraded"].contains(&status) {
        return Err(format!(
            "status: {status:?} is not online, offline or degraded"
        ));
    }
    let timestamp = integer(top, "timestamp")?;
    if timestamp <= 0.0 {
        return Err(format!("timestamp: {timestamp} is not positive"));
    }
    let metrics = object(top.get("metrics").ok_or("metrics: missing")?, "metrics")?;
    let at = |key: &str| format!("metrics.{key}");
    for key in ["cpuUsagePercent", "gpuUtilizationPercent"] {
        let x = number(metrics, key).map_err(|e| format!("metrics.{e}"))?;
        if !(0.0..=100.0).contains(&x) {
            return Err(format!("{}: {x} is outside 0..=100", at(key)));
        }
    }
    for key in ["memoryUsedGB", "avgLatencyMs"] {
        let x = number(metrics, key).map_err(|e| format!("metrics.{e}"))?;
        if x < 0.0 {
            return Err(format!("{}: {x} is negative", at(key)));
        }
    }
    for key in ["activeRequests", "totalRequestsHandled"] {
        let x = integer(metrics, key).map_err(|e| format!("metrics.{e}"))?;
        if x < 0.0 {
            return Err(format!("{}: {x} is negative", at(key)));
        }
    }
    let loaded = metrics
        .get("modelsLoaded")
        .and_then(Value::as_array)
        .ok_or("metrics.modelsLoaded: missing or not an array")?;
    if !loaded.iter().all(Value::is_string) {
        return Err("metrics.modelsLoaded: not an array of strings".to_owned());
    }
    Ok(())
}

fn object<'a>(value: &'a Value, what: &str) -> Result<&'a Map<String, Value>, String> {
    value
        .as_object()
        .ok_or_else(|| format!("{what}: not an object"))
}

fn string<'a>(object: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    object
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{key}: missing or not a string"))
}

fn number(object: &Map<String, Value>, key: &str) -> Result<f64, String> {
    object
        .get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("{key}: missing or not a number"))
}

fn integer(object: &Map<String, Value>, key: &str) -> Result<f64, String> {
    let x = number(object, key)?;
    if x.fract() != 0.0 {
        return Err(format!("{key}: {x} is not an integer"));
    }
    Ok(x)
}

/// Whether `s` is a UUID in its hyphenated form (8-4-4-4-12 hexadecimal digits).
fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    // Goal: the check accepts what the existing worker sends and refuses what the schema
    // would, naming the field.
    // Method: the heartbeat captured from the existing worker, then one change at a time.

    use serde_json::json;

    use super::*;

    /// Captured from the existing worker.
    fn captured() -> Value {
        json!({"workerId":"4892b71a-0000-4000-8000-000000000000","status":"online",
            "metrics":{"cpuUsagePercent":47,"memoryUsedGB":0.6297,"gpuUtilizationPercent":0,
            "activeRequests":0,"totalRequestsHandled":0,"avgLatencyMs":0,"modelsLoaded":[]},
            "timestamp":1795724487676_u64})
    }

    #[test]
    fn the_existing_workers_heartbeat_passes_and_extensions_pass_inside_metrics() {
        assert_eq!(check_heartbeat(&captured()), Ok(()));
        let mut extended = captured();
        extended["metrics"]["models"] = json!([{"modelId": "m", "batchSize": 8}]);
        assert_eq!(check_heartbeat(&extended), Ok(()));
    }

    #[test]
    fn what_the_schema_refuses_is_refused_by_name() {
        let cases: [(&str, Value, &str); 9] = [
            ("/workerId", json!("w-1"), "workerId"),
            ("/status", json!("busy"), "status"),
            ("/timestamp", json!(0), "timestamp"),
            (
                "/metrics/cpuUsagePercent",
                json!(101),
                "metrics.cpuUsagePercent",
            ),
            (
                "/metrics/activeRequests",
                json!(1.5),
                "metrics.activeRequests",
            ),
            (
                "/metrics/totalRequestsHandled",
                json!(-1),
                "metrics.totalRequestsHandled",
            ),
            ("/metrics/avgLatencyMs", json!("0"), "metrics.avgLatencyMs"),
            ("/metrics/modelsLoaded", json!([1]), "metrics.modelsLoaded"),
            ("/metrics", json!([]), "metrics"),
        ];
        for (pointer, value, named) in cases {
            let mut hb = captured();
            *hb.pointer_mut(pointer).unwrap() = value;
            let err = check_heartbeat(&hb).unwrap_err();
            assert!(err.starts_with(named), "{pointer}: {err}");
        }
        let mut hb = captured();
        hb.as_object_mut().unwrap().remove("metrics");
        assert_eq!(check_heartbeat(&hb), Err("metrics: missing".to_owned()));
        let mut hb = captured();
        hb["models"] = json!([]);
        assert!(check_heartbeat(&hb).unwrap_err().starts_with("models"));
    }
}
