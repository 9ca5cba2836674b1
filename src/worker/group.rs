//! Membership in the model queue groups: besides `worker.{id}.inference`, a worker takes
//! requests on `inference.{model}` for each model it serves, in one queue group, so a client
//! (or a cluster with no controller) spreads load over every worker that serves a model.
//!
//! Core NATS delivers at most once: a request the server routes to a subscription that is
//! being removed is lost. So a worker does not leave its groups while it serves: a full worker
//! answers `QUEUE_FULL` (the client retries, and the group routes it anywhere), and a draining
//! worker keeps serving what the groups route to it until it is idle and the groups have been
//! quiet for a second (or the drain deadline passes), and only then leaves. A request routed in
//! the last round trip before the unsubscribe can still be lost: clients of model subjects
//! should time out and retry, as with any core NATS request.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::SelectAll;
use tracing::{info, warn};

use crate::protocol::subject::{MODEL_QUEUE_GROUP, model_inference};
use crate::transport::{InboundMessage, Subscription, Transport};

/// The worker's membership in its models' queue groups.
pub(crate) struct ModelGroups {
    subjects: Vec<String>,
    subs: SelectAll<Subscription>,
}

impl ModelGroups {
    /// Groups for these model ids, not joined yet.
    pub(crate) fn new<'a>(models: impl IntoIterator<Item = &'a String>) -> ModelGroups {
        ModelGroups {
            subjects: models.into_iter().map(|m| model_inference(m)).collect(),
            subs: SelectAll::new(),
        }
    }

    /// Joins every group.
    pub(crate) async fn join(&mut self, transport: &Arc<dyn Transport>) {
        for subject in &self.subjects {
            match transport
                .subscribe(subject.clone(), Some(MODEL_QUEUE_GROUP.to_owned()))
                .await
            {
                Ok(sub) => self.subs.push(sub),
                Err(err) => warn!(%subject, cause = %err, "cannot join a model group"),
            }
        }
        if !self.subs.is_empty() {
            info!(groups = self.subs.len(), "joined the model queue groups");
        }
    }

    /// Joins the groups of those of `models` the worker is not in yet (a rescan found them).
    /// The groups of models gone from disk are kept: leaving one could lose a request routed
    /// to it in the last round trip, and their requests are refused as for any model not
    /// served.
    pub(crate) async fn add<'a>(
        &mut self,
        transport: &Arc<dyn Transport>,
        models: impl IntoIterator<Item = &'a String>,
    ) {
        for model in models {
            let subject = model_inference(model);
            if self.subjects.contains(&subject) {
                continue;
            }
            match transport
                .subscribe(subject.clone(), Some(MODEL_QUEUE_GROUP.to_owned()))
                .await
            {
                Ok(sub) => {
                    info!(%subject, "joined a new model's queue group");
                    self.subs.push(sub);
                }
                Err(err) => warn!(%subject, cause = %err, "cannot join a model group"),
            }
            self.subjects.push(subject);
        }
    }

    /// Whether the worker is in no group (it serves no model).
    pub(crate) fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Leaves every group.
    pub(crate) fn leave(&mut self) {
        if !self.subs.is_empty() {
            self.subs = SelectAll::new();
            info!("left the model queue groups");
        }
    }

    /// The next request from a group; waits forever while there is none to come.
    pub(crate) async fn next(&mut self) -> InboundMessage {
        match self.subs.next().await {
            Some(msg) => msg,
            None => {
                self.subs = SelectAll::new();
                std::future::pending().await
            }
        }
    }
}
