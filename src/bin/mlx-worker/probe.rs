//! `mlx-worker probe`: the detected hardware and the concurrency plan, as JSON.

use std::process::ExitCode;

use mlx_worker::config::Flags;
use mlx_worker::hardware;
use mlx_worker::plan::recommendation::Recommendation;
use mlx_worker::plan::report::probe_report;

use crate::exit::config_or_exit;
use crate::output::print_json;

pub(crate) async fn probe(flags: Flags) -> ExitCode {
    let config = match config_or_exit(&flags) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let probe = hardware::detect();
    let profile = probe.profile().await;
    let sample = probe.sample().await;
    let recommendation =
        Recommendation::for_profile(&profile).with_overrides(&config.node.tier_limits);
    let report = probe_report(&profile, &sample, &recommendation);
    print_json(&report)
}
