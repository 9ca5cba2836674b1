//! The one integration test binary: a real nats-server, the worker over the production
//! transport, and (in `engine`) the real MLX runtime with the tiny model. Nothing here skips:
//! a missing nats-server or runtime fails with a message saying how to install it.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod auth;
mod batching;
mod bodies;
mod capacity;
mod cli;
mod cluster;
mod control;
mod creds;
mod discovery;
mod engine;
mod faults;
mod fleet;
mod flood;
mod group;
mod health;
mod http;
mod instance;
mod jetstream;
mod keepalive;
mod logging;
mod operator;
mod outage;
mod presence;
mod privilege;
mod probe;
mod runtime_batch;
mod service;
mod sessions;
mod tls;
mod transport;
mod warmup;
mod watch;
mod worker;
