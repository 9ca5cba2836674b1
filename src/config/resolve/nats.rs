//! The `nats` section: servers (or the embedded server), credentials, TLS, reconnects.

use std::time::Duration;

use super::{comma_list, invalid, millis_or};
use crate::config::raw::{RawNats, RawNatsMode, RawTls};
use crate::config::secrets::{readable, secret_from};
use crate::config::{
    ConfigError, DEFAULT_EMBEDDED_PORT, DEFAULT_PING_INTERVAL, DEFAULT_RECONNECT_WAIT,
    EmbeddedNats, NatsAuth, NatsConfig, NatsTls, Secret,
};

pub(super) fn resolve_nats(n: RawNats) -> Result<NatsConfig, ConfigError> {
    let (servers, embedded) = servers(&n)?;
    let auth = auth(&n)?;
    let tls = tls(&n.tls, &servers)?;
    let max_reconnect_attempts = reconnect_attempts(n.reconnect, n.max_reconnect_attempts)?;
    let name = n.name.unwrap_or_else(|| "mlx-worker".to_owned());
    Ok(NatsConfig {
        servers,
        embedded,
        name,
        auth,
        tls,
        reconnect_wait_max: millis_or(
            "nats.reconnectTimeWait",
            n.reconnect_time_wait,
            DEFAULT_RECONNECT_WAIT,
            Duration::from_millis(10),
            Duration::from_secs(60),
        )?,
        max_reconnect_attempts,
        ping_interval: millis_or(
            "nats.pingIntervalMs",
            n.ping_interval_ms,
            DEFAULT_PING_INTERVAL,
            Duration::from_millis(100),
            Duration::from_secs(60),
        )?,
    })
}

/// The server URLs, and the embedded server when the worker runs its own.
fn servers(n: &RawNats) -> Result<(Vec<String>, Option<EmbeddedNats>), ConfigError> {
    let given: Vec<String> = match (&n.servers, &n.server_url) {
        (Some(list), _) => list.clone(),
        (None, Some(url)) => comma_list(url),
        (None, None) => Vec::new(),
    };
    let embedded = match n.mode {
        Some(RawNatsMode::Embedded) => true,
        Some(RawNatsMode::External) => false,
        None => given.is_empty(),
    };
    let (servers, embedded) = if embedded {
        let port = n.embedded.port.unwrap_or(DEFAULT_EMBEDDED_PORT);
        if port == 0 {
            return Err(invalid("nats.embedded.port", "must not be 0"));
        }
        (
            vec![format!("nats://127.0.0.1:{port}")],
            Some(EmbeddedNats { port }),
        )
    } else {
        if given.is_empty() {
            return Err(invalid(
                "nats.serverUrl",
                "is required when nats.mode is external",
            ));
        }
        (given, None)
    };
    for url in &servers {
        if url.is_empty() || url.chars().any(char::is_whitespace) {
            return Err(invalid("nats.serverUrl", format!("{url:?} is not a URL")));
        }
    }
    Ok((servers, embedded))
}

/// The one authentication method configured, secrets read from their files.
fn auth(n: &RawNats) -> Result<NatsAuth, ConfigError> {
    let password = secret_from(
        "nats.password",
        n.password.clone(),
        n.password_file.as_deref(),
    )?;
    let token = secret_from("nats.token", n.token.clone(), n.token_file.as_deref())?;
    let nkey = secret_from("nats.nkeySeedFile", None, n.nkey_seed_file.as_deref())?;
    let methods = [
        n.user.is_some() || password.is_some(),
        token.is_some(),
        nkey.is_some(),
        n.creds_file.is_some(),
    ];
    if methods.iter().filter(|m| **m).count() > 1 {
        return Err(invalid(
            "nats",
            "choose one of user and password, token, nkeySeedFile or credsFile",
        ));
    }
    Ok(
        match (n.user.clone(), password, token, nkey, n.creds_file.clone()) {
            (Some(user), Some(password), ..) => NatsAuth::UserPassword {
                user,
                password: Secret::new(password),
            },
            (Some(_), None, ..) | (None, Some(_), ..) => {
                return Err(invalid(
                    "nats.user",
                    "user and password must be set together",
                ));
            }
            (None, None, Some(token), ..) => NatsAuth::Token(Secret::new(token)),
            (None, None, None, Some(seed), _) => NatsAuth::NKey(Secret::new(seed)),
            (None, None, None, None, Some(path)) => {
                readable("nats.credsFile", &path)?;
                NatsAuth::CredsFile(path)
            }
            (None, None, None, None, None) => NatsAuth::None,
        },
    )
}

/// TLS settings; `tls://` servers require TLS whatever `required` says.
fn tls(t: &RawTls, servers: &[String]) -> Result<NatsTls, ConfigError> {
    let client_cert = match (t.cert_file.clone(), t.key_file.clone()) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => {
            return Err(invalid(
                "nats.tls",
                "certFile and keyFile must be set together",
            ));
        }
    };
    if let Some(ca) = &t.ca_file {
        readable("nats.tls.caFile", ca)?;
    }
    if let Some((cert, key)) = &client_cert {
        readable("nats.tls.certFile", cert)?;
        readable("nats.tls.keyFile", key)?;
    }
    Ok(NatsTls {
        required: t.required.unwrap_or(false) || servers.iter().any(|s| s.starts_with("tls://")),
        ca_file: t.ca_file.clone(),
        client_cert,
    })
}

/// Reconnect attempts: `reconnect: false` means none, a negative count no limit.
fn reconnect_attempts(
    reconnect: Option<bool>,
    attempts: Option<i64>,
) -> Result<Option<usize>, ConfigError> {
    Ok(match (reconnect, attempts) {
        (Some(false), _) => Some(0),
        (_, None) => None,
        (_, Some(a)) if a < 0 => None,
        (_, Some(0)) => {
            return Err(invalid(
                "nats.maxReconnectAttempts",
                "is 0, must be positive (or -1 for no limit)",
            ));
        }
        (_, Some(a)) => Some(usize::try_from(a).unwrap_or(usize::MAX)),
    })
}
