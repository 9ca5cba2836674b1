//! Simulated implementations of mlx-worker's four seams (`Transport`, `Engine`, `Clock`,
//! `HardwareProbe`) and the deterministic scenarios that drive the worker through them.
//!
//! A crate of its own, so release builds of the worker never carry it and the seams stay
//! honest: everything here goes through the library's public traits.

pub mod clock;
pub mod engine;
pub mod probe;

pub use clock::{SimClock, Skew};
pub use engine::{Fault, SimEngine, SimEngineConfig, SimEngineStats};
pub use probe::SimProbe;
