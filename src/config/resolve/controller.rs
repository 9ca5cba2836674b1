//! The `controller` section, read for one thing only: when the file also runs the controller on
//! this host, the worker's HTTP port must not be one the controller's HTTP server listens on,
//! or whichever starts second cannot bind. The controller's own file gives both 8080, so the
//! clash is reported before anything starts, with the settings that fix it.
//!
//! The controller runs on this host under the file when it enables it (`controller.enabled:
//! true`) and the file runs both roles (`mode: both`, or no `mode`: the controller's default).
//! The rest of the section, and any value the worker cannot read, is the controller's to judge.

use std::net::{IpAddr, Ipv4Addr};

use super::invalid;
use crate::config::raw::{Foreign, RawController, RawMode};
use crate::config::{ConfigError, ENV_PREFIX, NodeConfig, Setting};

/// The controller's HTTP port when its file sets none (its schema's default).
const CONTROLLER_PORT: u16 = 8080;
/// The controller's dashboard port when its file sets none (its schema's default).
const CONTROLLER_DASHBOARD_PORT: u16 = 8081;
/// The address the controller listens on when its file sets none (its schema's default).
const CONTROLLER_BIND_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// Refuses a worker port that the controller this file runs on the same host also binds.
pub(super) fn check_shared_host(
    mode: Option<&RawMode>,
    controller: Option<&Foreign<RawController>>,
    node: &NodeConfig,
) -> Result<(), ConfigError> {
    let Some(Foreign::Value(controller)) = controller else {
        return Ok(());
    };
    let runs_here = matches!(mode, None | Some(RawMode::Both))
        && controller.enabled == Some(Foreign::Value(true));
    // Port 0 is whichever port the system has free.
    if !runs_here || node.port == 0 {
        return Ok(());
    }
    let controller_address = match &controller.bind_address {
        None => Some(CONTROLLER_BIND_ADDRESS),
        Some(Foreign::Value(text)) => text.trim().parse().ok(),
        Some(Foreign::Unreadable) => None,
    };
    if !may_overlap(controller_address, node.http_bind_address) {
        return Ok(());
    }
    let ports = [
        ("controller.port", &controller.port, CONTROLLER_PORT),
        (
            "controller.dashboardPort",
            &controller.dashboard_port,
            CONTROLLER_DASHBOARD_PORT,
        ),
    ];
    for (key, value, default) in ports {
        let port = match value {
            None => default,
            Some(Foreign::Value(port)) => *port,
            Some(Foreign::Unreadable) => continue,
        };
        if port == node.port {
            return Err(shared_port(key, port));
        }
    }
    Ok(())
}

/// Whether sockets on `controller` and `worker` take the same connections for one port.
/// A controller address that is not an IP literal (a host name) overlaps only a worker on
/// every address; `::` also takes IPv4 (dual-stack sockets, the systems' default).
fn may_overlap(controller: Option<IpAddr>, worker: IpAddr) -> bool {
    let Some(controller) = controller else {
        return worker.is_unspecified();
    };
    let dual_stack = |a: IpAddr| a.is_ipv6() && a.is_unspecified();
    if controller.is_ipv4() == worker.is_ipv4() {
        controller == worker || controller.is_unspecified() || worker.is_unspecified()
    } else {
        dual_stack(controller) || dual_stack(worker)
    }
}

/// The error for a worker port that is also the controller's `key`.
fn shared_port(key: &str, port: u16) -> ConfigError {
    let setting = Setting::Port;
    let flag = setting.flag().map_or(String::new(), |f| format!(" / {f}"));
    invalid(
        setting.key(),
        format!(
            "{port} is also {key} {port} in this file, which runs the controller on this host \
             too (controller.enabled: true, mode: both or unset): set {} (or {ENV_PREFIX}{}{flag}) \
             to another port",
            setting.key(),
            setting.env_suffix(),
        ),
    )
}
