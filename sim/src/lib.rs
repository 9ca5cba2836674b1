//! Simulated implementations of mlx-worker's four seams (`Transport`, `Engine`, `Clock`,
//! `HardwareProbe`) and the deterministic world the scenarios drive the worker through.
//!
//! A crate of its own, so release builds of the worker never carry it and the seams stay
//! honest: everything here goes through the library's public traits.
//!
//! - [`Broker`] and [`SimTransport`]: a NATS-like broker on turmoil's network and the worker's
//!   transport to it ([`wire`] is their framed protocol);
//! - [`SimEngine`], [`SimClock`], [`SimProbe`]: the scripted engine, clock and probe;
//! - [`World`]: broker, worker and controller hosts built from a seed;
//! - [`Trace`] and [`invariants`]: what happened, and the promises it is checked against.

pub mod broker;
pub mod clock;
pub mod engine;
pub mod invariants;
pub mod probe;
pub mod trace;
pub mod transport;
pub mod wire;
pub mod world;

pub use broker::{Broker, BrokerConfig};
pub use clock::{SimClock, Skew};
pub use engine::{Batching, Fault, SimEngine, SimEngineConfig, SimEngineStats};
pub use invariants::{Limits, Violation};
pub use probe::SimProbe;
pub use trace::{Event, EventKind, FaultKind, Trace};
pub use transport::{SimTransport, SimTransportConfig};
pub use world::{Command, World, WorldConfig};
