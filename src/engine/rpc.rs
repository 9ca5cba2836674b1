//! JSON-RPC 2.0 over newline-delimited JSON, as the MLX runtime speaks it on stdio: request
//! encoding, classification of inbound lines (responses by id, stream notifications by
//! `stream_id`), and a line reader with a hard length cap.
//!
//! Every call the worker makes is a typed [`Call`]: its parameters serialize to the frame's
//! `params`, and the part of its result the worker reads deserializes from the answer.
//!
//! Both the existing mlx-serving runtime and ours are understood: single and batched
//! `stream.chunk` forms, our `stream.step` (the tokens of every stream of one generator step,
//! for streams started with `step_chunks`), `completed` / `error` / `cancelled` stream events.
//! Only this module and `engine::mlx` know the runtime's wire format.

#[cfg(test)]
mod tests;

use serde::de::{DeserializeOwned, Deserializer, IgnoredAny};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::limits::{RPC_LINE_BYTES_MAX, RPC_REQUEST_BYTES_MAX};

/// An outbound request.
#[derive(Debug, Serialize)]
pub struct Request<'a, P: ?Sized> {
    /// Always `2.0`.
    pub jsonrpc: &'static str,
    /// The method.
    pub method: &'a str,
    /// Its parameters.
    pub params: &'a P,
    /// Correlates the response.
    pub id: u64,
}

/// Why a request could not be encoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The line would exceed what the runtime reads.
    #[error("request line is {len} bytes, limit {RPC_REQUEST_BYTES_MAX}")]
    TooLarge {
        /// Its size.
        len: usize,
    },
    /// Serialization failed.
    #[error("cannot encode request: {0}")]
    Json(String),
}

/// Encodes one request as a line (with its newline), refusing one the runtime would reject.
/// serde_json escapes control characters, so the line holds no raw newline before the end.
pub fn encode_request<P: Serialize + ?Sized>(
    id: u64,
    method: &str,
    params: &P,
) -> Result<Vec<u8>, EncodeError> {
    let request = Request {
        jsonrpc: "2.0",
        method,
        params,
        id,
    };
    let mut line = serde_json::to_vec(&request).map_err(|e| EncodeError::Json(e.to_string()))?;
    if line.len() + 1 > RPC_REQUEST_BYTES_MAX {
        return Err(EncodeError::TooLarge {
            len: line.len() + 1,
        });
    }
    debug_assert!(!line.contains(&b'\n'));
    line.push(b'\n');
    Ok(line)
}

/// Encodes one call as a request line, as [`encode_request`] does.
pub fn encode_call<C: Call>(id: u64, call: &C) -> Result<Vec<u8>, EncodeError> {
    encode_request(id, C::METHOD, call)
}

/// A call the worker makes: its parameters, the method they go to, and what the worker reads
/// of its result.
///
/// The parameter structs declare their fields in alphabetical order, the order their frames
/// have always had on the pipe; the snapshots in this module's tests pin every frame.
pub trait Call: Serialize {
    /// The method.
    const METHOD: &'static str;
    /// What the worker reads of the result ([`IgnoredAny`] when it reads nothing).
    type Output: DeserializeOwned + Default;
}

/// Reads what the worker uses of a call's result. Each field read is taken only when it has
/// the expected type and is otherwise absent, and a result that is not an object reads as
/// empty: the runtimes differ in what they report, and a call succeeds on its answer alone.
pub fn decode_result<T: DeserializeOwned + Default>(result: Value) -> T {
    if !result.is_object() {
        return T::default();
    }
    serde_json::from_value(result).unwrap_or_default()
}

/// A result field taken only when it has the expected type.
fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned>(
    field: D,
) -> Result<Option<T>, D::Error> {
    Ok(serde_json::from_value(Value::deserialize(field)?).ok())
}

/// A result field holding an object, read as [`decode_result`] reads a result: only when it is
/// an object (serde would read a list by position), each of its fields leniently.
fn object<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(
    field: D,
) -> Result<Option<T>, D::Error> {
    Ok(match Value::deserialize(field)? {
        value @ Value::Object(_) => Some(decode_result(value)),
        _ => None,
    })
}

/// A result field holding a list of objects: each object item read as [`decode_result`] reads
/// a result; other items skipped, none when it is no list.
fn objects<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(
    field: D,
) -> Result<Vec<T>, D::Error> {
    Ok(match Value::deserialize(field)? {
        Value::Array(items) => items
            .into_iter()
            .filter(Value::is_object)
            .map(decode_result)
            .collect(),
        _ => Vec::new(),
    })
}

/// A result field holding a list of strings: its string items, none when it is no list.
fn strings<'de, D: Deserializer<'de>>(field: D) -> Result<Vec<String>, D::Error> {
    Ok(match Value::deserialize(field)? {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    })
}

/// `runtime/info`: the readiness probe and the liveness ping.
#[derive(Debug, Default, Serialize)]
pub struct GetInfo {}

impl Call for GetInfo {
    const METHOD: &'static str = "runtime/info";
    type Output = Info;
}

/// What the worker reads of `runtime/info`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Info {
    /// The runtime's version.
    #[serde(default, deserialize_with = "lenient")]
    pub version: Option<String>,
    /// MLX's version.
    #[serde(default, deserialize_with = "lenient")]
    pub mlx_version: Option<String>,
    /// Whether MLX runs on this host; the existing runtime says `false` where it cannot.
    #[serde(default, deserialize_with = "lenient")]
    pub mlx_supported: Option<bool>,
    /// What the runtime says it can do; `cancel` and `step_chunks` are the ones the worker
    /// looks for.
    #[serde(default, deserialize_with = "strings")]
    pub capabilities: Vec<String>,
    /// The runtime's bounds (ours states them; the existing runtime does not).
    #[serde(default, deserialize_with = "object")]
    pub limits: Option<InfoLimits>,
    /// The models loaded, with their batch sizes (ours states them; the existing runtime
    /// does not).
    #[serde(default, deserialize_with = "objects")]
    pub models: Vec<InfoModel>,
}

impl Info {
    /// Whether the runtime has the `cancel` method (ours does; the existing one does not).
    pub fn can_cancel(&self) -> bool {
        self.has("cancel")
    }

    /// Whether `generate` takes `step_chunks`, so a stream's tokens come in `stream.step`
    /// lines (ours does; the existing runtime does not).
    pub fn can_step_chunks(&self) -> bool {
        self.has("step_chunks")
    }

    /// Whether the runtime keeps a prefix cache per model: `load_model` takes its budget,
    /// `generate` a `session_id`, and `stream.stats` says `cached_tokens` (ours does; the
    /// existing runtime does not).
    pub fn can_prefix_cache(&self) -> bool {
        self.has("prefix_cache")
    }

    /// Whether the runtime's `load_model` runs a few generations before it answers, and
    /// takes `warm_up` to skip them (ours does; the existing runtime does not).
    pub fn can_warm_up(&self) -> bool {
        self.has("warm_up")
    }

    fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    /// The streams the runtime holds live at once, when it says.
    pub fn streams_live_max(&self) -> Option<u64> {
        self.limits.as_ref()?.streams_live_max
    }
}

/// What the worker reads of `runtime/info`'s `limits`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct InfoLimits {
    /// Streams live at once (generating or queued, across models), past which `generate` is
    /// refused.
    #[serde(default, deserialize_with = "lenient")]
    pub streams_live_max: Option<u64>,
    /// The batch size a `load_model` without `batch_size` gets.
    #[serde(default, deserialize_with = "lenient")]
    pub batch_size_default: Option<u64>,
    /// The prefill step a `load_model` without `prefill_step_size` gets, tokens.
    #[serde(default, deserialize_with = "lenient")]
    pub prefill_step_size_default: Option<u64>,
}

/// What the worker reads of one entry of `runtime/info`'s `models`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct InfoModel {
    /// The model's id.
    #[serde(default, deserialize_with = "lenient")]
    pub model_id: Option<String>,
    /// Its effective batch size.
    #[serde(default, deserialize_with = "lenient")]
    pub batch_size: Option<u64>,
    /// Whether its streams are decoded together.
    #[serde(default, deserialize_with = "lenient")]
    pub batched: Option<bool>,
}

/// `runtime/state`.
#[derive(Debug, Default, Serialize)]
pub struct GetState {}

impl Call for GetState {
    const METHOD: &'static str = "runtime/state";
    type Output = State;
}

/// What the worker reads of `runtime/state`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct State {
    /// Generations the runtime counts as live.
    #[serde(default, deserialize_with = "lenient")]
    pub active_streams: Option<u64>,
    /// The models loaded, with their prefix caches (ours states them).
    #[serde(default, deserialize_with = "objects")]
    pub loaded_models: Vec<StateModel>,
}

/// What the worker reads of one entry of `runtime/state`'s `loaded_models`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct StateModel {
    /// The model's id.
    #[serde(default, deserialize_with = "lenient")]
    pub model_id: Option<String>,
    /// Its prefix cache's figures; absent or null without one.
    #[serde(default, deserialize_with = "object")]
    pub prefix_cache: Option<PrefixCacheFigures>,
}

/// A model's prefix cache in `runtime/state`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PrefixCacheFigures {
    /// Bytes its entries hold.
    #[serde(default, deserialize_with = "lenient")]
    pub bytes: Option<u64>,
    /// Its entries.
    #[serde(default, deserialize_with = "lenient")]
    pub entries: Option<u64>,
    /// Entries evicted for room.
    #[serde(default, deserialize_with = "lenient")]
    pub evictions: Option<u64>,
}

/// `load_model`: loads the model at `local_path` under the id `model_id`, so that no network
/// is involved and `generate` uses the same id, decoding up to `batch_size` of its streams
/// together. Each figure is sent only when given (the runtime has a default for it); the
/// existing runtime ignores both.
#[derive(Debug, Serialize)]
pub struct LoadModel<'a> {
    /// Streams of the model decoded together; 1 is the sequential path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// The model's directory, absolute.
    pub local_path: &'a str,
    /// The id the model is kept under.
    pub model_id: &'a str,
    /// Prompt tokens processed per prefill step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill_step_size: Option<usize>,
    /// Bytes the model's prefix cache may hold; 0 turns it off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_cache_bytes: Option<u64>,
    /// Seconds a session's prefix cache entry stays pinned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_ttl_seconds: Option<u64>,
    /// Whether the load runs its warm-up generations (the runtime's default: it does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_up: Option<bool>,
}

impl Call for LoadModel<'_> {
    const METHOD: &'static str = "load_model";
    type Output = ModelLoaded;
}

/// What the worker reads of `load_model`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ModelLoaded {
    /// The model's context length, tokens.
    #[serde(default, deserialize_with = "lenient")]
    pub context_length: Option<u64>,
    /// The model's parameters; 0 when the runtime could not count them.
    #[serde(default, deserialize_with = "lenient")]
    pub parameter_count: Option<u64>,
    /// The effective batch size: streams of the model decoded together (1 on the sequential
    /// path, also when the model's cache cannot be batched).
    #[serde(default, deserialize_with = "lenient")]
    pub batch_size: Option<u64>,
    /// Whether the model's streams are decoded together.
    #[serde(default, deserialize_with = "lenient")]
    pub batched: Option<bool>,
    /// Seconds the load's warm-up generations took (a runtime with the `warm_up`
    /// capability runs them before it answers).
    #[serde(default, deserialize_with = "lenient")]
    pub warm_up_seconds: Option<f64>,
}

/// `unload_model`.
#[derive(Debug, Serialize)]
pub struct UnloadModel<'a> {
    /// The model's id.
    pub model_id: &'a str,
}

impl Call for UnloadModel<'_> {
    const METHOD: &'static str = "unload_model";
    type Output = IgnoredAny;
}

/// `generate`: starts a stream whose notifications carry `stream_id`.
#[derive(Debug, Serialize)]
pub struct Generate<'a> {
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// A loaded model's id.
    pub model_id: &'a str,
    /// Prompt text.
    pub prompt: &'a str,
    /// Whether the stream's tokens come in `stream.step` lines; sent only when true, and only
    /// to a runtime that has the capability.
    #[serde(skip_serializing_if = "is_false")]
    pub step_chunks: bool,
    /// The conversation the request continues, sent only to a runtime with a prefix cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<&'a str>,
    /// The stream's id, chosen by the worker.
    pub stream_id: &'a str,
    /// Whether tokens come as notifications; the worker always streams.
    pub streaming: bool,
    /// Sampling temperature.
    pub temperature: f64,
    /// Nucleus sampling mass.
    pub top_p: f64,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl Call for Generate<'_> {
    const METHOD: &'static str = "generate";
    type Output = IgnoredAny;
}

/// `cancel` (our runtime only): ends a stream early.
#[derive(Debug, Serialize)]
pub struct Cancel<'a> {
    /// The stream.
    pub stream_id: &'a str,
}

impl Call for Cancel<'_> {
    const METHOD: &'static str = "cancel";
    type Output = IgnoredAny;
}

/// `shutdown`: the runtime answers, then exits.
#[derive(Debug, Default, Serialize)]
pub struct Shutdown {}

impl Call for Shutdown {
    const METHOD: &'static str = "shutdown";
    type Output = IgnoredAny;
}

/// A JSON-RPC error object.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct RpcError {
    /// The code (−32700 … −32000 reserved; −32001 load error, …).
    pub code: i64,
    /// The message.
    pub message: String,
    /// Extra data.
    #[serde(default)]
    pub data: Option<Value>,
}

/// JSON-RPC codes the runtime uses.
pub mod code {
    /// The line was not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// The request was malformed or too large.
    pub const INVALID_REQUEST: i64 = -32600;
    /// Unknown method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Invalid parameters (and, in the existing runtime, unknown methods).
    pub const INVALID_PARAMS: i64 = -32602;
    /// A model failed to load.
    pub const MODEL_LOAD_ERROR: i64 = -32001;
    /// A generation failed.
    pub const GENERATION_ERROR: i64 = -32002;
    /// The model is not loaded.
    pub const MODEL_NOT_LOADED: i64 = -32005;
}

/// One token of a `stream.chunk` or a `stream.step`.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkToken {
    /// The token's text.
    pub text: String,
}

/// One entry of a `stream.step`: a token of one stream.
#[derive(Clone, Debug, PartialEq)]
pub struct StepChunk {
    /// The stream.
    pub stream_id: String,
    /// Its token.
    pub token: ChunkToken,
}

/// What the worker reads of a `stream.stats`; each figure absent when the runtime states none
/// (the existing runtime states no prompt or queue figures) or gives it with another type.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct StreamStats {
    /// Tokens of the prompt.
    #[serde(default, deserialize_with = "lenient")]
    pub prompt_tokens: Option<u64>,
    /// Of those, the ones found in the prefix cache (not prefilled).
    #[serde(default, deserialize_with = "lenient")]
    pub cached_tokens: Option<u64>,
    /// Seconds from the stream being taken into prefill to its first token.
    #[serde(default, deserialize_with = "lenient")]
    pub prompt_time: Option<f64>,
    /// Seconds from `generate` accepted to the stream being taken into prefill.
    #[serde(default, deserialize_with = "lenient")]
    pub queue_time: Option<f64>,
    /// Tokens generated.
    #[serde(default, deserialize_with = "lenient")]
    pub tokens_generated: Option<u64>,
    /// Seconds from the stream starting on the compute thread to its first token.
    #[serde(default, deserialize_with = "lenient")]
    pub time_to_first_token: Option<f64>,
    /// Seconds the stream took in all.
    #[serde(default, deserialize_with = "lenient")]
    pub total_time: Option<f64>,
}

/// How a stream ended, from its `stream.event`.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEnd {
    /// `completed`, with the runtime's finish reason (`length`, `stop`, `completed`, …).
    Completed {
        /// The reason as given.
        finish_reason: String,
    },
    /// `error`, with the message.
    Failed {
        /// The runtime's message.
        error: String,
    },
    /// `cancelled` (our runtime's answer to `cancel`).
    Cancelled,
}

/// A classified inbound line.
#[derive(Clone, Debug, PartialEq)]
pub enum Inbound {
    /// A response to request `id`.
    Response {
        /// The id echoed back (numeric ids only: the worker sends no others).
        id: Option<u64>,
        /// The result or the error.
        outcome: Result<Value, RpcError>,
    },
    /// Tokens of a stream, in order.
    Chunk {
        /// The stream.
        stream_id: String,
        /// Its tokens.
        tokens: Vec<ChunkToken>,
    },
    /// The tokens of one generator step, of any number of streams, in the step's order (a
    /// stream's own entries in its token order).
    Step {
        /// The entries, in line order.
        chunks: Vec<StepChunk>,
    },
    /// A stream's statistics (before its completion event).
    Stats {
        /// The stream.
        stream_id: String,
        /// Its figures.
        stats: StreamStats,
    },
    /// The end of a stream.
    End {
        /// The stream.
        stream_id: String,
        /// How it ended.
        end: StreamEnd,
    },
    /// A notification the worker does not use.
    Other {
        /// Its method.
        method: String,
    },
}

/// Why an inbound line could not be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON.
    #[error("runtime line is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not a JSON-RPC message this client understands.
    #[error("runtime line is not a JSON-RPC message: {0}")]
    Malformed(String),
}

fn string_field(params: &Value, field: &str) -> Result<String, DecodeError> {
    params
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| DecodeError::Malformed(format!("missing string field {field:?}")))
}

fn chunk_token(entry: &Value) -> Result<ChunkToken, DecodeError> {
    Ok(ChunkToken {
        text: string_field(entry, "token")?,
    })
}

fn step_chunk(entry: &Value) -> Result<StepChunk, DecodeError> {
    Ok(StepChunk {
        stream_id: string_field(entry, "stream_id")?,
        token: chunk_token(entry)?,
    })
}

/// Classifies one line from the runtime's stdout.
pub fn decode_line(line: &[u8]) -> Result<Inbound, DecodeError> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(DecodeError::Malformed("not an object".to_owned()));
    };
    if let Some(method) = map.get("method").and_then(Value::as_str) {
        let params = map.get("params").cloned().unwrap_or(Value::Null);
        return match method {
            "stream.chunk" => {
                let stream_id = string_field(&params, "stream_id")?;
                let tokens = match params.get("tokens").and_then(Value::as_array) {
                    Some(batch) => batch.iter().map(chunk_token).collect::<Result<_, _>>()?,
                    None => vec![chunk_token(&params)?],
                };
                Ok(Inbound::Chunk { stream_id, tokens })
            }
            "stream.step" => {
                let entries = params
                    .get("chunks")
                    .and_then(Value::as_array)
                    .ok_or_else(|| {
                        DecodeError::Malformed("missing list field \"chunks\"".into())
                    })?;
                let chunks = entries.iter().map(step_chunk).collect::<Result<_, _>>()?;
                Ok(Inbound::Step { chunks })
            }
            "stream.stats" => Ok(Inbound::Stats {
                stream_id: string_field(&params, "stream_id")?,
                stats: decode_result(params),
            }),
            "stream.event" => {
                let stream_id = string_field(&params, "stream_id")?;
                let end = match params.get("event").and_then(Value::as_str) {
                    Some("completed") => StreamEnd::Completed {
                        finish_reason: params
                            .get("finish_reason")
                            .and_then(Value::as_str)
                            .unwrap_or("completed")
                            .to_owned(),
                    },
                    Some("error") => StreamEnd::Failed {
                        error: params
                            .get("error")
                            .and_then(Value::as_str)
                            .unwrap_or("unknown error")
                            .to_owned(),
                    },
                    Some("cancelled") => StreamEnd::Cancelled,
                    other => {
                        return Err(DecodeError::Malformed(format!(
                            "unknown stream event {other:?}"
                        )));
                    }
                };
                Ok(Inbound::End { stream_id, end })
            }
            other => Ok(Inbound::Other {
                method: other.to_owned(),
            }),
        };
    }
    let id = map.get("id").and_then(Value::as_u64);
    let outcome = match (map.get("result"), map.get("error")) {
        (_, Some(error)) => Err(serde_json::from_value::<RpcError>(error.clone())
            .map_err(|e| DecodeError::Malformed(format!("bad error object: {e}")))?),
        (Some(result), None) => Ok(result.clone()),
        (None, None) => {
            return Err(DecodeError::Malformed(
                "neither method, result nor error".to_owned(),
            ));
        }
    };
    Ok(Inbound::Response { id, outcome })
}

/// What reading one line gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line, without its newline.
    Complete(Vec<u8>),
    /// A line longer than the cap; it was read to its end and discarded.
    TooLong {
        /// Bytes it had.
        len: usize,
    },
    /// End of input.
    Eof,
}

/// Reads one `\n`-terminated line of at most `cap` bytes into `buf` (cleared first), without
/// ever holding more than `cap` bytes of it in memory.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<Line> {
    buf.clear();
    let mut len = 0usize;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            // A final line without its newline still counts.
            return Ok(match (len, len > cap) {
                (0, _) => Line::Eof,
                (_, true) => Line::TooLong { len },
                _ => Line::Complete(std::mem::take(buf)),
            });
        }
        let (chunk, found) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        len += chunk.len();
        if len <= cap {
            buf.extend_from_slice(chunk);
        } else {
            buf.clear();
        }
        let consumed = found.unwrap_or(chunk.len());
        reader.consume(consumed);
        if found.is_some() {
            return Ok(if len > cap {
                Line::TooLong { len }
            } else {
                Line::Complete(std::mem::take(buf))
            });
        }
    }
}

/// The default cap for runtime lines.
pub const LINE_CAP: usize = RPC_LINE_BYTES_MAX;
