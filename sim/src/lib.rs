//! Simulated implementations of mlx-worker's four seams (`Transport`, `Engine`, `Clock`,
//! `HardwareProbe`) and the deterministic scenarios that drive the worker through them.
