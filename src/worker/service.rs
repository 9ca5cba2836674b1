//! Answers the NATS services protocol (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`) for this worker,
//! so `nats micro ls/info/stats` list and inspect workers, with the load figures in the stats'
//! `data`: among them `models`, each model's batching figures as the heartbeat carries them
//! (what runs and waits now, the engine's batch size, and the rates of the last heartbeat).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::SelectAll;
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::figures::{Figures, model_metrics};
use super::health::ModelHealth;
use crate::engine::Engine;
use crate::metrics::models::ModelRates;
use crate::metrics::telemetry::{self, Telemetry};
use crate::protocol::service::{
    EndpointInfo, EndpointStats, InfoResponse, PingResponse, SERVICE_NAME, ServiceHeader,
    StatsResponse, rfc3339, subjects,
};
use crate::protocol::{self, subject};
use crate::transport::{Subscription, Transport};

/// The service task's parts.
pub(crate) struct Service {
    pub(crate) worker_id: String,
    pub(crate) transport: Arc<dyn Transport>,
    /// The dispatcher's figures, as last published.
    pub(crate) figures: watch::Receiver<Figures>,
    pub(crate) telemetry: Arc<Telemetry>,
    /// When the run started, Unix milliseconds.
    pub(crate) started_ms: u64,
    /// The engine, for its figures of each model.
    pub(crate) engine: Arc<dyn Engine>,
    /// The rates of each model at the last heartbeat.
    pub(crate) rates: watch::Receiver<BTreeMap<String, ModelRates>>,
    /// The withdrawn models, which `$SRV.INFO` lists with their reasons.
    pub(crate) health: Arc<ModelHealth>,
}

impl Service {
    /// Answers until `stop` fires.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut subs: SelectAll<Subscription> = SelectAll::new();
        for (subject, _) in subjects(&self.worker_id) {
            match self.transport.subscribe(subject.clone(), None).await {
                Ok(sub) => subs.push(sub),
                Err(err) => warn!(%subject, cause = %err, "service discovery subject refused"),
            }
        }
        loop {
            let msg = tokio::select! {
                () = stop.cancelled() => return,
                msg = subs.next() => match msg {
                    Some(msg) => msg,
                    None => return,
                },
            };
            let Some(reply) = msg.reply else { continue };
            let verb = msg.subject.split('.').nth(1).unwrap_or("");
            let payload = match verb {
                "PING" => encode(&self.ping()),
                "INFO" => encode(&self.info()),
                "STATS" => encode(&self.stats()),
                _ => continue,
            };
            if let Some(payload) = payload
                && let Err(err) = self.transport.publish(reply, payload).await
            {
                debug!(cause = %err, "service discovery answer not sent");
            }
        }
    }

    fn header(&self, kind: &str) -> ServiceHeader {
        ServiceHeader {
            kind: format!("io.nats.micro.v1.{kind}"),
            name: SERVICE_NAME.to_owned(),
            id: self.worker_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            metadata: BTreeMap::from([("worker_id".to_owned(), self.worker_id.clone())]),
        }
    }

    fn ping(&self) -> PingResponse {
        PingResponse {
            header: self.header("ping_response"),
        }
    }

    fn endpoint(&self) -> EndpointInfo {
        EndpointInfo {
            name: "inference".to_owned(),
            subject: subject::inference(&self.worker_id),
            queue_group: String::new(),
            metadata: BTreeMap::new(),
        }
    }

    fn info(&self) -> InfoResponse {
        InfoResponse {
            header: self.header("info_response"),
            description: "MLX inference worker: tokens stream on response.<requestId>".to_owned(),
            endpoints: vec![self.endpoint()],
            withdrawn_models: self
                .health
                .withdrawn()
                .into_iter()
                .map(|(model, w)| (model, w.shown()))
                .collect(),
        }
    }

    fn stats(&self) -> StatsResponse {
        let view = self.figures.borrow().clone();
        let durations = self.telemetry.request_duration.read();
        let processing_ns = (durations.sum * 1e9) as u64;
        let snapshot = &view.snapshot;
        let loads = view.model_loads(&self.engine.model_figures());
        let models = model_metrics(&loads, &self.rates.borrow());
        let endpoint = self.endpoint();
        StatsResponse {
            header: self.header("stats_response"),
            started: rfc3339(self.started_ms),
            endpoints: vec![EndpointStats {
                name: endpoint.name,
                subject: endpoint.subject,
                queue_group: endpoint.queue_group,
                num_requests: snapshot.total,
                num_errors: snapshot.total - snapshot.successes,
                last_error: String::new(),
                processing_time: processing_ns,
                average_processing_time: processing_ns.checked_div(durations.count).unwrap_or(0),
                data: json!({
                    "activeRequests": view.running + view.queued,
                    "running": view.running,
                    "queueDepth": view.queued,
                    "queueCapacity": view.queue_capacity,
                    "inflightCapacity": view.inflight_capacity,
                    "tokensGenerated": snapshot.tokens_total,
                    "tokensPerSecond": snapshot.tokens_per_second,
                    "idConflicts": telemetry::read(&self.telemetry.id_conflicts),
                    "errorsByCode": snapshot
                        .errors_by_code
                        .iter()
                        .map(|(code, n)| (code.as_str().to_owned(), json!(n)))
                        .collect::<serde_json::Map<_, _>>(),
                    "models": models,
                }),
            }],
        }
    }
}

fn encode<T: Serialize>(message: &T) -> Option<Bytes> {
    protocol::encode(message).ok().map(Bytes::from)
}
