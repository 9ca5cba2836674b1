//! The model control subject, `worker.{workerId}.models` (this worker's extension): an
//! operator lists the worker's models, loads, unloads and pins them, and has the model
//! directories scanned again, each by one request whose reply says how it went. Every reply
//! carries the models as they are after the operation; a refusal carries one of the protocol's
//! error codes.
//!
//! ```text
//! → {"op":"list"}
//! → {"op":"load","modelId":"org/name"}
//! → {"op":"unload","modelId":"org/name"}
//! → {"op":"pin","modelId":"org/name","pinned":true}
//! → {"op":"rescan"}
//! ← {"ok":true,"models":[{"modelId":"org/name","state":"loaded",…}]}
//! ← {"ok":false,"code":"MODEL_NOT_FOUND","error":"…","models":[…]}
//! ```

use serde::{Deserialize, Serialize};

use super::service::WithdrawnModel;

/// Largest control request read, in bytes.
pub const CONTROL_REQUEST_BYTES_MAX: usize = 4096;

/// One control request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", deny_unknown_fields)]
pub enum ControlRequest {
    /// The models and their states.
    List {},
    /// Load a model (a withdrawn one too: this is its retry), making room within the memory
    /// budget.
    #[serde(rename_all = "camelCase")]
    Load {
        /// The model.
        model_id: String,
    },
    /// Unload a model no request uses; it is unpinned.
    #[serde(rename_all = "camelCase")]
    Unload {
        /// The model.
        model_id: String,
    },
    /// Pin a model (kept loaded: neither unloaded when idle nor evicted), or unpin it.
    #[serde(rename_all = "camelCase")]
    Pin {
        /// The model.
        model_id: String,
        /// Pinned or not.
        pinned: bool,
    },
    /// Scan the model directories now.
    Rescan {},
}

/// A model's state on the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ModelState {
    /// Loaded in the engine.
    Loaded,
    /// On disk, not loaded; a request loads it.
    Available,
    /// Its load failed; left out of the registrations until its retry.
    Withdrawn,
}

/// One model in a reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlModel {
    /// Its id.
    pub model_id: String,
    /// Where it lives, as the registration's `modelPaths` gives it.
    pub path: String,
    /// Bytes of its files.
    pub size_bytes: u64,
    /// Loaded, available or withdrawn.
    pub state: ModelState,
    /// Loaded at start, and kept loaded.
    pub preloaded: bool,
    /// Pinned through this subject, and kept loaded.
    pub pinned: bool,
    /// Requests using it now.
    pub in_use: usize,
    /// Why it is withdrawn, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withdrawn: Option<WithdrawnModel>,
}

/// The reply to a control request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlReply {
    /// Whether the operation was carried out.
    pub ok: bool,
    /// The refusal's code (one of the protocol's error codes), when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The refusal, in words, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Every model, after the operation.
    pub models: Vec<ControlModel>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_messages_are_pinned() {
        let requests = [
            r#"{"op":"list"}"#,
            r#"{"op":"load","modelId":"org/a"}"#,
            r#"{"op":"unload","modelId":"org/a"}"#,
            r#"{"op":"pin","modelId":"org/a","pinned":true}"#,
            r#"{"op":"rescan"}"#,
        ];
        for text in requests {
            let request: ControlRequest = serde_json::from_str(text).unwrap();
            assert_eq!(serde_json::to_string(&request).unwrap(), text);
        }
        for bad in [
            r#"{"op":"load"}"#,
            r#"{"op":"format"}"#,
            r#"{"op":"list","x":1}"#,
            r#"{"op":"pin","modelId":"org/a"}"#,
        ] {
            assert!(
                serde_json::from_str::<ControlRequest>(bad).is_err(),
                "{bad}"
            );
        }
        let reply = ControlReply {
            ok: false,
            code: Some("MODEL_NOT_FOUND".to_owned()),
            error: Some("model \"org/z\" is not in the model directories".to_owned()),
            models: vec![
                ControlModel {
                    model_id: "org/a".to_owned(),
                    path: "models/org/a".to_owned(),
                    size_bytes: 1024,
                    state: ModelState::Loaded,
                    preloaded: true,
                    pinned: false,
                    in_use: 2,
                    withdrawn: None,
                },
                ControlModel {
                    model_id: "org/b".to_owned(),
                    path: "models/org/b".to_owned(),
                    size_bytes: 2048,
                    state: ModelState::Withdrawn,
                    preloaded: false,
                    pinned: false,
                    in_use: 0,
                    withdrawn: Some(WithdrawnModel {
                        reason: "weights are not safetensors".to_owned(),
                        failed_at: 1_000,
                        failures: 1,
                        retry_at: 31_000,
                    }),
                },
            ],
        };
        insta::assert_snapshot!(serde_json::to_string_pretty(&reply).unwrap());
    }
}
