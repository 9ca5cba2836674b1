//! libFuzzer target: see `mlx_worker_fuzz::config_loader`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mlx_worker_fuzz::config_loader(data));
