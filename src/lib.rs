//! mlx-worker: the worker node of a distributed LLM-inference cluster.
//!
//! A worker joins a cluster over NATS, announces its hardware and models, sends heartbeats,
//! takes inference requests on its own subject, runs them on a local engine (MLX, through a
//! Python runtime spoken to with JSON-RPC over stdio) and streams every token back over NATS.
//! Its wire format is the one the existing mlx-serving controller (TypeScript) expects.
//!
//! # Layout
//!
//! Modules in reading order:
//!
//! - [`limits`]: every hard bound, as documented constants.
//! - [`protocol`]: the NATS wire messages, subjects, error codes and inbound validation.
//! - [`hardware`]: the `HardwareProbe` seam and host profiles.
//! - [`plan`]: model size tiers, the per-tier concurrency table and the worker's plan for its
//!   host (the scheduler's limits, each model's tier, the announced capabilities).
//! - [`config`]: the layered configuration (YAML, then `MLX_WORKER_*` environment, then flags).
//! - [`backoff`]: the capped, jittered delays of every retry loop.
//! - [`clock`], [`transport`], [`engine`]: the other three seams and their production
//!   implementations (system clock, NATS, the MLX runtime, whose model catalog is the scan of
//!   [`engine::catalog`]).
//! - [`scheduler`], [`admission`], [`metrics`], [`lifecycle`], [`identity`]: the worker's pure
//!   parts; [`instance`]: one process per worker id (the state-directory lock, the check on
//!   the bus).
//! - [`worker`]: `Worker::run`, the task tree that ties everything together.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`; [`mutation`]: planted bugs for the sims.
//! - [`client`]: the requesting side of the protocol, over a `Transport`: send a request and
//!   read its response stream, checked.

pub mod admission;
pub mod backoff;
pub mod client;
pub mod clock;
pub mod config;
pub mod engine;
pub mod hardware;
pub mod http;
pub mod identity;
pub mod instance;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod mutation;
pub mod plan;
pub mod protocol;
pub mod scheduler;
pub mod transport;
pub mod worker;
