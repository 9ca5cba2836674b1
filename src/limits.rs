//! The worker's hard bounds, as documented constants: the sizes, counts, capacities, durations
//! and retry delays that cap what inputs, peers and failures can make the worker hold, wait for
//! or repeat.
//!
//! A few bounds are still declared beside their code: those private to one part of `worker`,
//! `engine`, `models` or `hardware` (a channel's capacity, a grace period, the depth of a
//! directory scan), and the ranges `config` accepts for some intervals and timeouts.
//!
//! Where the configuration sets one of these (sizes of a request, requests in flight and
//! waiting, tags, timeouts, the heartbeat), it may tighten the bound, never loosen it: `config`
//! checks each configured value against the constant here. The relations between the constants
//! are checked at compile time at the bottom of the file, so a change that breaks one does not
//! build.

use std::time::Duration;

/// Largest NATS payload the worker publishes or accepts: nats-server's default `max_payload`.
pub const NATS_PAYLOAD_BYTES_MAX: usize = 1024 * 1024;

/// Largest prompt, in UTF-8 bytes, that a request may carry.
pub const PROMPT_BYTES_MAX: usize = 512 * 1024;

/// Largest `maxTokens` a request may ask for (the MLX runtime's own generation cap).
pub const MAX_TOKENS_MAX: u32 = 4096;

/// Most messages a client reads from one response stream: every token a request may ask for,
/// then its terminal message.
pub const STREAM_MESSAGES_MAX: usize = MAX_TOKENS_MAX as usize + 1;

/// Longest request id, worker id or session id, in bytes.
pub const ID_BYTES_MAX: usize = 128;

/// Longest model id, in bytes (the MLX runtime rejects longer ones).
pub const MODEL_ID_BYTES_MAX: usize = 512;

/// Deepest JSON nesting accepted in an inbound NATS message.
pub const JSON_DEPTH_MAX: usize = 32;

/// Bytes of an inbound request that the lenient request-id scan looks at, when the body does
/// not parse: all of any message within the payload limit.
pub const REQUEST_ID_SCAN_BYTES_MAX: usize = NATS_PAYLOAD_BYTES_MAX;

/// Longest line read from the MLX runtime's stdout. The existing runtime repeats the whole
/// text so far in every token, so its lines grow with the output; ours are short.
pub const RPC_LINE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Longest line written to the MLX runtime's stdin (the runtime rejects longer ones).
pub const RPC_REQUEST_BYTES_MAX: usize = 1024 * 1024;

/// Largest configuration file read, in bytes.
pub const CONFIG_BYTES_MAX: usize = 1024 * 1024;

/// Most requests one worker runs at once, whatever the configuration says.
pub const INFLIGHT_REQUESTS_MAX: usize = 1024;

/// Streams the MLX runtime holds live at once (generating or queued) when its `runtime/info`
/// states no `limits.streams_live_max` (the existing runtime's does not): our runtime's default
/// (`STREAMS_LIVE_MAX_DEFAULT` in `runtime/mlx_runtime/limits.py`), past which it refuses
/// `generate`. The worker runs no more requests at once than the runtime's figure.
pub const RUNTIME_STREAMS_LIVE_DEFAULT: usize = 64;

/// Streams of one model the MLX runtime decodes together when a load names no batch size: our
/// runtime's default (`BATCH_SIZE_DEFAULT` in `runtime/mlx_runtime/limits.py`).
pub const RUNTIME_BATCH_SIZE_DEFAULT: usize = 8;

/// Streams of one model the runtime may be asked to decode together (`runtime.batchSize`).
pub const BATCH_SIZE_MAX: usize = 1024;
/// Fewest prompt tokens of one prefill step (`runtime.prefillStepSize`), as the runtime takes.
pub const PREFILL_STEP_SIZE_MIN: usize = 16;
/// Most prompt tokens of one prefill step, as the runtime takes.
pub const PREFILL_STEP_SIZE_MAX: usize = 8192;
/// Most bytes a model's prefix cache may be given (`runtime.prefixCacheBytes`): 1 PiB, the
/// runtime's own bound.
pub const PREFIX_CACHE_BYTES_MAX: u64 = 1 << 50;
/// Longest a session's prefix cache entry may stay pinned (`runtime.sessionTtlMs`): a week,
/// the runtime's own bound.
pub const SESSION_TTL_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest keep-alive of an unused model (a week).
pub const KEEP_ALIVE_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Largest model memory budget (1 PiB).
pub const MODEL_MEMORY_BYTES_MAX: u64 = 1 << 50;
/// Longest period of the model directories' rescan (a day).
pub const MODEL_RESCAN_MAX: Duration = Duration::from_secs(24 * 3600);
/// Most words of `runtime.command`, and of variables in `runtime.env`.
pub const RUNTIME_COMMAND_WORDS_MAX: usize = 64;
/// Longest word of `runtime.command`, name or value of `runtime.env`, in bytes.
pub const RUNTIME_COMMAND_WORD_BYTES_MAX: usize = 4096;
/// The default prefix cache budget of a model is this share of the host's memory…
pub const PREFIX_CACHE_MEMORY_DIVISOR: u64 = 10;
/// …at least this…
pub const PREFIX_CACHE_BYTES_DEFAULT_MIN: u64 = 64 << 20;
/// …and at most this.
pub const PREFIX_CACHE_BYTES_DEFAULT_MAX: u64 = 8 << 30;

/// Most requests one worker holds waiting for a slot.
pub const QUEUE_DEPTH_MAX: usize = 10_000;

/// Most tags a worker may carry, and the longest tag in bytes.
pub const TAGS_MAX: usize = 32;
/// Longest tag, in bytes.
pub const TAG_BYTES_MAX: usize = 64;

/// Capacity, in events, of the channel that carries one generation's tokens from the engine to
/// the publisher; once it is full the engine holds tokens back ([`TOKENS_HELD_MAX`]).
pub const TOKEN_CHANNEL_CAPACITY: usize = 64;

/// Tokens an engine holds back for one generation whose channel is full, to hand over together
/// once the consumer has room; past it the engine waits, so memory per stream stays bounded.
pub const TOKENS_HELD_MAX: usize = 256;

/// Most tokens of one stream the worker hands to the transport in one call: those ready at
/// once, when its publishing has fallen behind the engine.
pub const TOKENS_PUBLISHED_TOGETHER_MAX: usize = 512;

/// Messages a subscription buffers before the client drops them as a slow consumer. A burst
/// of requests must fit (each gets an answer, if only `QUEUE_FULL`); the memory this can take
/// is bounded by the server's own limit on what it holds for a slow client (64 MiB by default).
pub const SUBSCRIPTION_CAPACITY: usize = 65_536;

/// Samples kept by the metrics collector's rolling window.
pub const METRICS_WINDOW_REQUESTS: usize = 1000;

/// Shortest heartbeat interval the configuration accepts.
pub const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(50);

/// The most messages a work-queue stream may be configured to hold.
pub const WORK_QUEUE_MESSAGES_MAX: u64 = 10_000_000;
/// The most bytes a work-queue stream may be configured to hold.
pub const WORK_QUEUE_BYTES_MAX: u64 = 64 << 30;
/// How long one pull of a work queue waits for messages at most; a draining worker is done
/// with its pulls within this.
pub const WORK_QUEUE_PULL_WAIT: Duration = Duration::from_secs(1);
/// How long a worker waits for the work queue to confirm a request's start.
pub const WORK_QUEUE_ACK_WAIT: Duration = Duration::from_secs(5);
/// The longest pause between two failed pulls of a work queue.
pub const WORK_QUEUE_RETRY_MAX: Duration = Duration::from_secs(5);

/// Longest any single request may run, whatever the configuration or the request says.
pub const REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(3600);

/// Longest drain the worker waits for at stop.
pub const DRAIN_TIMEOUT_MAX: Duration = Duration::from_secs(3600);

/// Longest the worker holds the first message of a stream while nobody listens yet.
pub const LATE_SUBSCRIBER_WAIT_MAX: Duration = Duration::from_secs(60);

/// Longest fixed delay the configuration may put between a request's receipt and the first
/// message of its stream (`worker.lateSubscriberMinDelayMs`).
pub const LATE_SUBSCRIBER_MIN_DELAY_MAX: Duration = Duration::from_secs(10);

/// First delay cap between two listener checks of one message; it doubles per check up to
/// [`LISTENER_CHECK_DELAY_MAX`].
pub const LISTENER_CHECK_DELAY_MIN: Duration = Duration::from_millis(1);

/// Longest delay between two listener checks of one message.
pub const LISTENER_CHECK_DELAY_MAX: Duration = Duration::from_millis(50);

/// Longest a response message waits for a listener once the worker's link came back after a
/// loss, when the configured wait is shorter: clients reconnect and subscribe again on their
/// own backoff (async-nats waits up to 4 s between attempts, the existing controller 2 s).
/// The request's deadline cuts it short.
pub const LISTENER_REJOIN_WAIT: Duration = Duration::from_secs(10);

/// Longest a terminal message may take to hand to the connection, beyond the waits for the
/// link and for a listener.
pub const TERMINAL_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Times a terminal message is sent again because the link was lost while it was checked.
pub const TERMINAL_ATTEMPTS_MAX: u32 = 8;

/// Longest wait for a flush of the connection outside a request (the goodbye, the stop):
/// async-nats holds a flush until the link is back.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// First registration retry delay cap; it doubles per failed attempt up to
/// [`REGISTER_BACKOFF_MAX`].
pub const REGISTER_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Upper bound of the registration retry backoff.
pub const REGISTER_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Presence messages (registrations, heartbeats) the worker remembers having published, to
/// tell them from another process's when NATS echoes them back. Each comes back within a
/// round trip, and the worker publishes a few per heartbeat interval at most.
pub const OWN_ANNOUNCEMENTS_REMEMBERED: usize = 64;

/// Shortest time between two warnings that another process announces this worker's id; the
/// conflicts in between are counted, and the next warning says how many there were.
pub const ID_CONFLICT_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// How far back the fault ratio of the heartbeat's `degraded` status looks.
pub const FAULT_WINDOW: Duration = Duration::from_secs(60);

/// Requests the fault ratio needs within [`FAULT_WINDOW`] before it can make a worker degraded.
pub const FAULT_MIN_SAMPLES: usize = 5;

/// Time request tasks get, after the drain deadline, to publish their terminal messages.
pub const TERMINAL_GRACE: Duration = Duration::from_secs(5);

/// Quiet time on the model groups before a draining worker leaves them.
pub const GROUP_QUIET: Duration = Duration::from_secs(1);

/// Time the engine gets to exit cleanly at stop.
pub const ENGINE_STOP_GRACE: Duration = Duration::from_secs(5);

/// Responder tasks for refused requests that may wait for a listener at once; past this, a
/// refusal is published without waiting, so a flood cannot pile up tasks.
pub const REFUSAL_TASKS_MAX: usize = 256;

/// Cancels remembered for requests that have not arrived yet.
pub const LATCHED_CANCELS_MAX: usize = 1024;

/// How long a latched cancel waits for its request.
pub const LATCHED_CANCEL_TTL: Duration = Duration::from_secs(60);

/// Largest secret file (password, token, NKey seed) the configuration reads.
pub const SECRET_FILE_BYTES_MAX: u64 = 64 * 1024;

/// Distinct model labels the metrics' lifetime counters keep; a flood of made-up model ids
/// cannot grow them further.
pub const MODEL_LABELS_MAX: usize = 64;

/// Longest a connection attempt to the message server may take; past it, the first attempt
/// falls back to retrying in the background.
pub const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Cap of the first reconnect delay; the cap doubles per attempt up to the configured
/// `nats.reconnectTimeWait`.
pub const NATS_RECONNECT_DELAY_MIN: Duration = Duration::from_millis(100);

/// Longest wait for the marker of a listener check; past it the link is considered stalled.
pub const LISTENER_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for the embedded nats-server's readiness line.
pub const EMBEDDED_NATS_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest HTTP request head (request line and headers) the HTTP port reads.
pub const HTTP_REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;

/// Time an HTTP client has to send its request head.
pub const HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP connections served at once; more wait in the listen backlog.
pub const HTTP_CONNECTIONS_MAX: usize = 64;

/// First delay cap of the HTTP port after a failed accept (out of file descriptors, say); it
/// doubles per failure in a row up to [`HTTP_ACCEPT_BACKOFF_MAX`].
pub const HTTP_ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);

/// Longest the HTTP port waits between accepts while accepting fails.
pub const HTTP_ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Longest the start-up waits for another instance of the worker id to answer on the bus (and,
/// before that, for the connection the question needs). Silence means no other instance.
pub const INSTANCE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest small state file read back (the state-directory lock, the embedded server's record).
pub const STATE_FILE_BYTES_MAX: u64 = 4096;

/// Longest wait for an orphaned embedded nats-server to exit, after SIGTERM and again after
/// SIGKILL.
pub const EMBEDDED_ORPHAN_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of JSON framing around a prompt in an inference request, at most, besides the
/// prompt itself (ids, numbers, field names, escapes are counted in the prompt's share).
const REQUEST_FRAMING_BYTES: usize = 4 * 1024;

const _: () = assert!(PROMPT_BYTES_MAX + REQUEST_FRAMING_BYTES <= NATS_PAYLOAD_BYTES_MAX);
const _: () = assert!(PROMPT_BYTES_MAX + REQUEST_FRAMING_BYTES <= RPC_REQUEST_BYTES_MAX);
const _: () = assert!(RPC_REQUEST_BYTES_MAX <= RPC_LINE_BYTES_MAX);
const _: () = assert!(ID_BYTES_MAX <= MODEL_ID_BYTES_MAX);
const _: () = assert!(BATCH_SIZE_MAX <= INFLIGHT_REQUESTS_MAX);
const _: () = assert!(RUNTIME_BATCH_SIZE_DEFAULT <= RUNTIME_STREAMS_LIVE_DEFAULT);
const _: () = assert!(PREFILL_STEP_SIZE_MIN <= PREFILL_STEP_SIZE_MAX);
const _: () = assert!(NATS_PAYLOAD_BYTES_MAX <= REQUEST_ID_SCAN_BYTES_MAX);
const _: () = assert!(INFLIGHT_REQUESTS_MAX <= QUEUE_DEPTH_MAX);
const _: () = assert!(0 < RUNTIME_STREAMS_LIVE_DEFAULT);
const _: () = assert!(RUNTIME_STREAMS_LIVE_DEFAULT <= INFLIGHT_REQUESTS_MAX);
const _: () = assert!(TAGS_MAX * TAG_BYTES_MAX <= REQUEST_FRAMING_BYTES);
const _: () = assert!(0 < TOKEN_CHANNEL_CAPACITY && 0 < TOKENS_HELD_MAX);
const _: () = assert!(TOKENS_HELD_MAX <= MAX_TOKENS_MAX as usize);
const _: () = assert!(0 < TOKENS_PUBLISHED_TOGETHER_MAX);
const _: () = assert!(HTTP_ACCEPT_BACKOFF_MIN.as_nanos() <= HTTP_ACCEPT_BACKOFF_MAX.as_nanos());
const _: () = assert!(LISTENER_CHECK_DELAY_MIN.as_nanos() <= LISTENER_CHECK_DELAY_MAX.as_nanos());
const _: () =
    assert!(LATE_SUBSCRIBER_MIN_DELAY_MAX.as_nanos() <= LATE_SUBSCRIBER_WAIT_MAX.as_nanos());
const _: () = assert!(LISTENER_CHECK_TIMEOUT.as_nanos() <= TERMINAL_SEND_TIMEOUT.as_nanos());
const _: () = assert!(REGISTER_BACKOFF_MIN.as_nanos() <= REGISTER_BACKOFF_MAX.as_nanos());
