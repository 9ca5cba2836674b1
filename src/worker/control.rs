//! Answers the model control subject, `worker.{id}.models` (see [`crate::protocol::control`]):
//! lists the models, loads, unloads and pins them, and rescans the model directories, one
//! request at a time; each reply carries the models as they are after the operation, and a
//! refusal one of the protocol's error codes. A message without a reply subject, or one past
//! [`CONTROL_REQUEST_BYTES_MAX`], is logged and dropped: there is nobody to answer, or it is
//! not a control request.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::health::Withdrawal;
use super::keeper::loaded;
use super::request::RequestContext;
use super::scan_models;
use crate::engine::{Catalog, EngineError};
use crate::protocol::control::{
    CONTROL_REQUEST_BYTES_MAX, ControlModel, ControlReply, ControlRequest, ModelState,
};
use crate::protocol::{ErrorCode, subject};

/// The control task's parts.
pub(crate) struct Control {
    pub(crate) worker_id: String,
    pub(crate) ctx: Arc<RequestContext>,
    /// The models on disk; a rescan sends the new scan.
    pub(crate) catalogs: Arc<watch::Sender<Catalog>>,
}

impl Control {
    /// Answers until `stop` fires.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let subject = subject::models(&self.worker_id);
        let mut sub = match self.ctx.transport.subscribe(subject.clone(), None).await {
            Ok(sub) => sub,
            Err(err) => {
                warn!(%subject, cause = %err, "cannot take the model control subject");
                return;
            }
        };
        loop {
            let msg = tokio::select! {
                () = stop.cancelled() => return,
                msg = sub.next() => match msg {
                    Some(msg) => msg,
                    None => return,
                },
            };
            let Some(reply) = msg.reply else {
                debug!("a model control message without a reply subject; dropped");
                continue;
            };
            let answer = self.answer(&msg.payload).await;
            let Ok(payload) = serde_json::to_vec(&answer) else {
                continue;
            };
            if let Err(err) = self
                .ctx
                .transport
                .publish(reply, Bytes::from(payload))
                .await
            {
                debug!(cause = %err, "model control reply not sent");
            }
        }
    }

    async fn answer(&self, payload: &[u8]) -> ControlReply {
        if payload.len() > CONTROL_REQUEST_BYTES_MAX {
            return self.refusal(
                ErrorCode::PayloadTooLarge,
                format!(
                    "a control request is at most {CONTROL_REQUEST_BYTES_MAX} bytes, this one {}",
                    payload.len()
                ),
            );
        }
        let request: ControlRequest = match serde_json::from_slice(payload) {
            Ok(request) => request,
            Err(e) => {
                return self.refusal(
                    ErrorCode::InvalidRequest,
                    format!(
                        "not a control request ({e}); see the protocol's model control subject"
                    ),
                );
            }
        };
        match self.carry_out(&request).await {
            Ok(()) => self.reply(None),
            Err(err) => self.refusal(err.code(), err.to_string()),
        }
    }

    async fn carry_out(&self, request: &ControlRequest) -> Result<(), EngineError> {
        let ctx = &self.ctx;
        match request {
            ControlRequest::List {} => Ok(()),
            ControlRequest::Rescan {} => {
                info!("model rescan asked on the control subject");
                scan_models(ctx, &self.catalogs).await
            }
            ControlRequest::Load { model_id } => {
                self.known(model_id)?;
                info!(model = %model_id, "model load asked on the control subject");
                ctx.loader
                    .load(&ctx.engine, &ctx.clock, model_id)
                    .await
                    .map(drop)
            }
            ControlRequest::Unload { model_id } => {
                self.known(model_id)?;
                ctx.loader.keeper.unload(&ctx.engine, model_id).await
            }
            ControlRequest::Pin { model_id, pinned } => {
                self.known(model_id)?;
                info!(model = %model_id, pinned, "model pin set on the control subject");
                ctx.loader.keeper.pin(model_id, *pinned);
                Ok(())
            }
        }
    }

    /// Refuses a model that is not on disk.
    fn known(&self, model: &str) -> Result<(), EngineError> {
        if self.catalogs.borrow().models.contains_key(model) {
            Ok(())
        } else {
            Err(EngineError::ModelNotFound {
                model: model.to_owned(),
            })
        }
    }

    fn refusal(&self, code: ErrorCode, error: String) -> ControlReply {
        self.reply(Some((code, error)))
    }

    fn reply(&self, refusal: Option<(ErrorCode, String)>) -> ControlReply {
        let ctx = &self.ctx;
        let keeper = &ctx.loader.keeper;
        let withdrawn = ctx.loader.health.withdrawn();
        let engine_loaded = loaded(&ctx.engine);
        let models = self
            .catalogs
            .borrow()
            .models
            .iter()
            .map(|(id, entry)| {
                let withdrawal = withdrawn.get(id).map(Withdrawal::shown);
                let state = if engine_loaded.contains(id) {
                    ModelState::Loaded
                } else if withdrawal.is_some() {
                    ModelState::Withdrawn
                } else {
                    ModelState::Available
                };
                ControlModel {
                    model_id: id.clone(),
                    path: entry.path.display().to_string(),
                    size_bytes: entry.size_bytes,
                    state,
                    preloaded: keeper.is_preloaded(id),
                    pinned: keeper.is_pinned(id),
                    in_use: keeper.holders(id),
                    withdrawn: withdrawal,
                }
            })
            .collect();
        let (code, error) = match refusal {
            Some((code, error)) => (Some(code.as_str().to_owned()), Some(error)),
            None => (None, None),
        };
        ControlReply {
            ok: code.is_none(),
            code,
            error,
            models,
        }
    }
}
