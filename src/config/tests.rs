// Goal: every file the worker is promised to read loads, every mistake names its key (and line),
// and environment then flags override the file in that order.
// Method: the shipped example and two reference layouts from fixtures/, a snapshot of the
// resolved defaults, a table of broken files with their one-line messages, and override lists
// built in the test (the process environment is never touched).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn yaml(text: &str) -> Result<WorkerConfig, ConfigError> {
    from_yaml(text, Path::new("test.yaml"))
}

fn env(pairs: &[(&str, &str)]) -> Vec<Override> {
    let vars: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    environment_overrides(&vars).unwrap()
}

fn flag(setting: Setting, flag: &'static str, value: &str) -> Override {
    Override {
        setting,
        value: value.to_owned(),
        origin: Origin::Flag(flag),
    }
}

#[test]
fn resolved_defaults_are_pinned() {
    insta::assert_debug_snapshot!("defaults", yaml("").unwrap());
}

#[test]
fn the_shipped_example_loads_and_matches_the_defaults() {
    let example = load(Some(&repo("config/cluster.yaml")), &[], &[]).unwrap();
    // The example documents the defaults; it must not drift from them.
    assert_eq!(example, yaml("").unwrap());
}

#[test]
fn a_file_written_for_the_existing_controller_loads_unchanged() {
    let c = load(
        Some(&repo("fixtures/config/existing-controller.yaml")),
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(c.nats.embedded, Some(EmbeddedNats { port: 4222 }));
    assert_eq!(c.nats.servers, vec!["nats://127.0.0.1:4222".to_owned()]);
    assert_eq!(c.nats.max_reconnect_attempts, Some(10));
    assert_eq!(c.nats.reconnect_wait_max, Duration::from_millis(2000));
    assert_eq!(c.nats.auth, NatsAuth::None);
    assert_eq!(c.node.worker_id, None);
    assert_eq!(c.node.port, 8080);
    assert_eq!(c.node.heartbeat_interval, Duration::from_secs(5));
    assert_eq!(c.node.queue_depth_max, 100);
    // preWarming.enabled is false there, so its model list is not preloaded.
    assert!(c.engine.preload.is_empty());
    assert_eq!(c.engine.load_timeout, Duration::from_millis(30000));
    assert_eq!(c.logging.format, LogFormat::Json);
}

#[test]
fn the_prd_layout_with_snake_case_keys_loads() {
    let c = load(Some(&repo("fixtures/config/prd-snake-case.yaml")), &[], &[]).unwrap();
    assert_eq!(c.nats.embedded, None);
    assert_eq!(c.nats.servers, vec!["nats://192.0.2.100:4222".to_owned()]);
    assert_eq!(
        c.node.tier_limits.get(&ModelTier::Huge),
        Some(&TierLimit {
            max_concurrent: 3,
            queue_depth: 25
        })
    );
}

#[test]
fn a_misspelt_key_is_an_error_naming_the_key_and_its_line() {
    let text = "nats:\n  mode: external\n  serverUrl: nats://h:4222\ndiscovery:\n  heartbeatIntervalMss: 100\n";
    let err = yaml(text).unwrap_err().to_string();
    assert!(err.contains("heartbeatIntervalMss"), "{err}");
    assert!(err.contains("line 5"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");

    let err = yaml("wroker:\n  port: 1\n").unwrap_err().to_string();
    assert!(err.contains("wroker") && err.contains("line 1"), "{err}");
}

#[test]
fn invalid_values_name_their_key() {
    let cases = [
        "worker:\n  workerId: a.b\n",
        "worker:\n  tags: ['']\n",
        "worker:\n  priority: 101\n",
        "worker:\n  maxConcurrent: 0\n",
        "worker:\n  requestQueue:\n    maxDepth: 100000\n",
        "worker:\n  limits:\n    promptBytesMax: 99999999\n",
        "worker:\n  limits:\n    maxTokensMax: 5000\n",
        "worker:\n  defaults:\n    topP: 0\n",
        "worker:\n  defaults:\n    maxTokens: 5000\n",
        "worker:\n  tierLimits:\n    '7B': { maxConcurrent: 1 }\n",
        "worker:\n  tierLimits:\n    '<3B': { queueDepth: 1 }\n",
        "worker:\n  requestTimeoutMs: 0\n",
        "worker:\n  degradedErrorRatio: 0\n",
        "discovery:\n  heartbeatIntervalMs: 10\n",
        "nats:\n  mode: external\n",
        "nats:\n  user: u\n",
        "nats:\n  token: t\n  user: u\n  password: p\n",
        "nats:\n  maxReconnectAttempts: 0\n",
        "nats:\n  mode: sideways\n",
        "worker:\n  port: 70000\n",
        "cluster:\n  worker:\n    port: 1\nworker:\n  port: 2\n",
        "worker: [1, 2]\n",
        "a: &a [1]\nb: *a\n",
    ];
    let report: Vec<String> = cases
        .iter()
        .map(|text| {
            let err = yaml(text).expect_err(text).to_string();
            assert!(!err.contains('\n'), "one line: {err}");
            format!("{}=> {err}", text.replace('\n', "⏎"))
        })
        .collect();
    insta::assert_snapshot!("invalid_values", report.join("\n"));
}

#[test]
fn environment_overrides_the_file_and_flags_override_the_environment() {
    let file = repo("fixtures/config/existing-controller.yaml");
    let e = env(&[
        ("MLX_WORKER_NATS_URL", "nats://a:4222, nats://b:4222"),
        ("MLX_WORKER_NATS_MODE", "external"),
        ("MLX_WORKER_ID", "from-env"),
        ("MLX_WORKER_PORT", "9000"),
        ("MLX_WORKER_HEARTBEAT_INTERVAL_MS", "250"),
        ("MLX_WORKER_TAGS", "a,b"),
        ("MLX_WORKER_CONFIG", "ignored-here.yaml"),
    ]);
    let f = [
        flag(Setting::WorkerId, "--worker-id", "from-flag"),
        flag(Setting::Preload, "--preload", "org/m1,org/m2"),
    ];
    let c = load(Some(&file), &e, &f).unwrap();
    assert_eq!(c.nats.embedded, None);
    assert_eq!(c.nats.servers, vec!["nats://a:4222", "nats://b:4222"]);
    assert_eq!(c.node.worker_id.as_deref(), Some("from-flag"));
    assert_eq!(c.node.port, 9000);
    assert_eq!(c.node.heartbeat_interval, Duration::from_millis(250));
    assert_eq!(c.node.tags, vec!["a", "b"]);
    assert_eq!(c.engine.preload, vec!["org/m1", "org/m2"]);

    // Without the flag, the environment's id stands.
    let c = load(Some(&file), &e, &[]).unwrap();
    assert_eq!(c.node.worker_id.as_deref(), Some("from-env"));
}

#[test]
fn bad_overrides_name_their_origin_and_hide_secrets() {
    let err = load(None, &env(&[("MLX_WORKER_PORT", "eighty")]), &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "environment variable MLX_WORKER_PORT (worker.port): \"eighty\" is not a port number"
    );
    let err = load(None, &[], &[flag(Setting::NatsMode, "--nats-mode", "both")]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "flag --nats-mode (nats.mode): \"both\" is not embedded or external"
    );
    let vars = vec![("MLX_WORKER_HEARTBEAT".to_owned(), "1".to_owned())];
    let err = environment_overrides(&vars).unwrap_err().to_string();
    assert!(
        err.starts_with("unknown environment variable MLX_WORKER_HEARTBEAT; known: "),
        "{err}"
    );

    // A secret never shows, in errors or in the resolved configuration's Debug.
    let c = load(
        None,
        &env(&[
            ("MLX_WORKER_NATS_USER", "u"),
            ("MLX_WORKER_NATS_PASSWORD", "hunter2"),
        ]),
        &[],
    )
    .unwrap();
    assert!(!format!("{c:?}").contains("hunter2"));
    match &c.nats.auth {
        NatsAuth::UserPassword { user, password } => {
            assert_eq!(user, "u");
            assert_eq!(password.expose(), "hunter2");
        }
        other => panic!("expected user and password, got {other:?}"),
    }
}

#[test]
fn every_setting_has_a_distinct_env_name_and_key() {
    let mut names: Vec<&str> = Setting::ALL.iter().map(|s| s.env_suffix()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), Setting::ALL.len());
    // Each key names a real place in the file: setting it through YAML must load.
    for setting in Setting::ALL {
        assert!(setting.key().contains('.'), "{setting:?}");
    }
}

#[test]
fn an_oversized_or_missing_file_is_a_clear_error() {
    let err = load(Some(Path::new("/nonexistent/cluster.yaml")), &[], &[]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot read config file /nonexistent/cluster.yaml")
    );
    let big = "# x\n".repeat(crate::limits::CONFIG_BYTES_MAX / 4 + 1);
    let err = yaml(&big).unwrap_err().to_string();
    assert!(err.contains("limit 1048576"), "{err}");
}

#[test]
fn a_secret_file_must_be_a_small_regular_file() {
    // A device never ends and reports size 0; it is refused before any read.
    let err = yaml("nats:\n  tokenFile: /dev/zero\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/dev/zero is not a regular file"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("token");
    std::fs::write(
        &big,
        "t".repeat(crate::limits::SECRET_FILE_BYTES_MAX as usize + 1),
    )
    .unwrap();
    let err = yaml(&format!("nats:\n  tokenFile: {}\n", big.display()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is over 65536 bytes"), "{err}");
    // The secret itself never shows in the message.
    assert!(!err.contains("ttt"), "{err}");
    let ok = dir.path().join("ok");
    std::fs::write(&ok, "s3cret-token\n").unwrap();
    let config = yaml(&format!("nats:\n  tokenFile: {}\n", ok.display())).unwrap();
    assert!(matches!(
        config.nats.auth,
        NatsAuth::Token(ref t) if t.expose() == "s3cret-token"
    ));
}

/// A "billion laughs" document: ten levels, each a list of ten aliases of the level before, so
/// the last level would expand to 10^10 scalars. Its anchors sit under `controller`, a section
/// whose value is read and discarded, so nothing but the expansion budget stands in the way.
fn alias_bomb() -> String {
    let mut text = String::from(
        "controller:\n  file:\n    - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for level in 1..10 {
        let prev = format!("*l{}", level - 1);
        let items = [prev.as_str(); 10].join(", ");
        text.push_str(&format!("    - &l{level} [{items}]\n"));
    }
    text
}

#[test]
fn an_alias_bomb_is_rejected_before_it_expands() {
    let bomb = alias_bomb();
    // Small in itself: it is the expansion, not the size, that must be refused.
    assert!(bomb.len() < 1024, "{}", bomb.len());
    #[allow(clippy::disallowed_methods)] // Measures the parser's own time, nothing else.
    let started = std::time::Instant::now();
    let err = yaml(&bomb).unwrap_err();
    #[allow(clippy::disallowed_methods)] // As above.
    let took = started.elapsed();
    let message = err.to_string();
    assert!(matches!(err, ConfigError::Yaml { .. }), "{message}");
    assert!(message.starts_with("config file test.yaml: "), "{message}");
    assert!(
        message.contains("alias replay limit exceeded"),
        "names the aliases: {message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");
    // Expanding even 10^7 scalars takes seconds; refusing up front takes milliseconds.
    assert!(took < Duration::from_secs(1), "took {took:?}: {message}");
}

#[test]
fn a_few_aliases_in_a_normal_file_are_accepted() {
    let text = "worker:\n  tierLimits:\n    '<3B': &small { maxConcurrent: 4, queueDepth: 50 }\n    \
                '3-7B': *small\n    '7-13B': &big { maxConcurrent: 2, queueDepth: 20 }\n    \
                '13-27B': *big\n";
    let c = yaml(text).unwrap();
    let small = TierLimit {
        max_concurrent: 4,
        queue_depth: 50,
    };
    let big = TierLimit {
        max_concurrent: 2,
        queue_depth: 20,
    };
    assert_eq!(c.node.tier_limits.get(&ModelTier::Tiny), Some(&small));
    assert_eq!(c.node.tier_limits.get(&ModelTier::Small), Some(&small));
    assert_eq!(c.node.tier_limits.get(&ModelTier::Medium), Some(&big));
    assert_eq!(c.node.tier_limits.get(&ModelTier::Large), Some(&big));
}

#[test]
fn a_file_that_runs_no_worker_on_this_host_is_refused() {
    let err = yaml("mode: controller\n").unwrap_err().to_string();
    assert_eq!(
        err,
        "config key mode: is controller, which runs no worker, must be worker or both"
    );
    for mode in ["worker", "both"] {
        assert_eq!(yaml(&format!("mode: {mode}\n")).unwrap(), yaml("").unwrap());
    }
}

#[test]
fn logging_file_names_the_file_the_logs_go_to() {
    let c = yaml("logging:\n  file: /var/log/mlx-worker.log\n").unwrap();
    assert_eq!(
        c.logging.file,
        Some(PathBuf::from("/var/log/mlx-worker.log"))
    );
    // The existing controller's file spells "no file" as null.
    assert_eq!(yaml("logging:\n  file: null\n").unwrap().logging.file, None);
    assert_eq!(yaml("").unwrap().logging.file, None);
    let err = yaml("logging:\n  file: ''\n").unwrap_err().to_string();
    assert_eq!(err, "config key logging.file: is empty");
}
