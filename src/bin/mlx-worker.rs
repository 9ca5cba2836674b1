//! The `mlx-worker` binary.

fn main() {}
