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
fn the_work_queue_mode_takes_its_defaults_and_ties_the_maximum_age_to_the_request_timeout() {
    let c =
        yaml("worker:\n  requestTimeoutMs: 20000\nmodelSubjects:\n  mode: jetstream\n").unwrap();
    insta::assert_debug_snapshot!("work_queue_defaults", c.node.model_subjects);
    let ModelSubjects::JetStream(queue) = c.node.model_subjects else {
        panic!("jetstream mode");
    };
    assert_eq!(
        queue.max_age,
        Duration::from_secs(80),
        "the request timeout and a minute"
    );
    let c = yaml("modelSubjects:\n  mode: queue-group\n").unwrap();
    assert_eq!(c.node.model_subjects, ModelSubjects::QueueGroup);
    let e = yaml("modelSubjects:\n  mode: queue-group\n  replicas: 3\n").unwrap_err();
    assert!(e.to_string().contains("modelSubjects.replicas"), "{e}");
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
        "worker:\n  httpBindAddress: localhost\n",
        "modelSubjects:\n  mode: jetstream\n  stream: a.b\n",
        "modelSubjects:\n  mode: jetstream\n  replicas: 0\n",
        "modelSubjects:\n  mode: jetstream\n  subjects: ['orders.>']\n",
        "modelSubjects:\n  mode: jetstream\n  ackWaitMs: 10\n",
        "modelSubjects:\n  mode: fifo\n",
        "runtime:\n  batchSize: 0\n",
        "runtime:\n  batchSize: 1025\n",
        "runtime:\n  prefillStepSize: 15\n",
        "runtime:\n  prefillStepSize: 8193\n",
        "runtime:\n  batching: sometimes\n",
        "runtime:\n  command: []\n",
        "runtime:\n  command: ['  ', '-m', 'x']\n",
        "runtime:\n  command: python3\n",
        "runtime:\n  env:\n    1X: a\n",
        "runtime:\n  env:\n    A-B: a\n",
        "runtime:\n  env:\n    A: [1]\n",
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
fn batching_settings_come_from_the_file_the_environment_and_flags() {
    let defaults = yaml("").unwrap().engine;
    assert_eq!(
        (
            defaults.batching,
            defaults.batch_size,
            defaults.prefill_step_size
        ),
        (true, None, 512)
    );
    let file = yaml("runtime:\n  batching: false\n  batchSize: 4\n  prefillStepSize: 1024\n")
        .unwrap()
        .engine;
    assert_eq!(
        (file.batching, file.batch_size, file.prefill_step_size),
        (false, Some(4), 1024)
    );
    let snake = yaml("runtime:\n  batch_size: 1024\n  prefill_step_size: 16\n")
        .unwrap()
        .engine;
    assert_eq!(
        (snake.batch_size, snake.prefill_step_size),
        (Some(1024), 16)
    );
    let e = env(&[
        ("MLX_WORKER_RUNTIME_BATCHING", "false"),
        ("MLX_WORKER_RUNTIME_BATCH_SIZE", "16"),
        ("MLX_WORKER_RUNTIME_PREFILL_STEP_SIZE", "256"),
    ]);
    let c = load(None, &e, &[]).unwrap().engine;
    assert_eq!(
        (c.batching, c.batch_size, c.prefill_step_size),
        (false, Some(16), 256)
    );
    let f = [
        flag(Setting::Batching, "--batching", "true"),
        flag(Setting::BatchSize, "--batch-size", " 2 "),
        flag(Setting::PrefillStepSize, "--prefill-step-size", "8192"),
    ];
    let c = load(None, &e, &f).unwrap().engine;
    assert_eq!(
        (c.batching, c.batch_size, c.prefill_step_size),
        (true, Some(2), 8192)
    );
    // An override out of range is refused as the file's value is, naming the key.
    let err = load(None, &env(&[("MLX_WORKER_RUNTIME_BATCH_SIZE", "0")]), &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "config key runtime.batchSize: is 0, must be between 1 and 1024"
    );
    let err = load(
        None,
        &[],
        &[flag(
            Setting::PrefillStepSize,
            "--prefill-step-size",
            "9000",
        )],
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "config key runtime.prefillStepSize: is 9000, must be between 16 and 8192"
    );
    let err = load(None, &env(&[("MLX_WORKER_RUNTIME_BATCHING", "yes")]), &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "environment variable MLX_WORKER_RUNTIME_BATCHING (runtime.batching): \"yes\" is not \
         true or false"
    );
    let err = load(
        None,
        &[],
        &[flag(Setting::BatchSize, "--batch-size", "eight")],
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "flag --batch-size (runtime.batchSize): \"eight\" is not a positive integer"
    );
}

#[test]
fn model_directories_are_one_path_or_several_in_order() {
    let dirs = |c: WorkerConfig| c.engine.model_dirs;
    let paths = |p: &[&str]| p.iter().map(PathBuf::from).collect::<Vec<_>>();
    assert_eq!(dirs(yaml("").unwrap()), paths(&["model"]));
    // One path, as the existing controller's file gives it.
    assert_eq!(
        dirs(yaml("worker:\n  modelDir: /srv/models\n").unwrap()),
        paths(&["/srv/models"])
    );
    let list = "worker:\n  model_dir:\n    - models\n    - /home/u/.cache/huggingface/hub\n";
    assert_eq!(
        dirs(yaml(list).unwrap()),
        paths(&["models", "/home/u/.cache/huggingface/hub"])
    );
    // Text is split at each `:`, as PATH is, in the file, the environment and flags alike.
    let text = "models: /srv/hub:";
    assert_eq!(
        dirs(yaml(&format!("worker:\n  modelDir: '{text}'\n")).unwrap()),
        paths(&["models", "/srv/hub"])
    );
    let e = env(&[("MLX_WORKER_MODEL_DIR", text)]);
    assert_eq!(
        dirs(load(None, &e, &[]).unwrap()),
        paths(&["models", "/srv/hub"])
    );
    let f = [flag(Setting::ModelDir, "--model-dir", "/a:/b")];
    assert_eq!(dirs(load(None, &e, &f).unwrap()), paths(&["/a", "/b"]));
    // Nothing to scan is a mistake, not an empty catalog.
    let err = load(None, &env(&[("MLX_WORKER_MODEL_DIR", " : ")]), &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "config key worker.modelDir: names no directory"
    );
    let err = yaml("worker:\n  modelDir: []\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "config key worker.modelDir: names no directory"
    );
    let err = yaml("worker:\n  modelDir: [models, '']\n").unwrap_err();
    assert_eq!(err.to_string(), "config key worker.modelDir[1]: is empty");
    let err = load(
        None,
        &[],
        &[flag(Setting::ModelDir, "--model-dir", "m:~/hub")],
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "config key worker.modelDir: ~/hub starts with ~, which the worker does not expand: give \
         the full path"
    );
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

#[test]
fn the_http_port_binds_the_configured_address() {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    // All IPv4 addresses unless configured otherwise, as before the setting existed.
    assert_eq!(
        yaml("").unwrap().node.http_bind_address,
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    );
    let cases = [
        ("127.0.0.1", IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ("'::1'", IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ("'::'", IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        ("192.0.2.7", IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))),
    ];
    for (text, address) in cases {
        let c = yaml(&format!("worker:\n  httpBindAddress: {text}\n")).unwrap();
        assert_eq!(c.node.http_bind_address, address, "{text}");
        let c = yaml(&format!("worker:\n  http_bind_address: {text}\n")).unwrap();
        assert_eq!(c.node.http_bind_address, address, "snake_case {text}");
    }
    let c = load(None, &env(&[("MLX_WORKER_HTTP_BIND_ADDRESS", "::1")]), &[]).unwrap();
    assert_eq!(c.node.http_bind_address, IpAddr::V6(Ipv6Addr::LOCALHOST));
    // A host name, a bracketed literal or an address with a port is not an address.
    for text in ["localhost", "'[::1]'", "'127.0.0.1:8080'", "''"] {
        let err = yaml(&format!("worker:\n  httpBindAddress: {text}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config key worker.httpBindAddress: ")
                && err.contains("is not an IP address"),
            "{text}: {err}"
        );
    }
    let err = load(
        None,
        &env(&[("MLX_WORKER_HTTP_BIND_ADDRESS", "localhost")]),
        &[],
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "environment variable MLX_WORKER_HTTP_BIND_ADDRESS (worker.httpBindAddress): \
         \"localhost\" is not an IP address (an IPv4 or IPv6 literal such as 127.0.0.1 or ::1)"
    );
}

/// The existing controller's file with its controller enabled, as on a host that runs both.
fn controller_enabled(extra_worker: &str, controller_bind: &str) -> String {
    let text = std::fs::read_to_string(repo("fixtures/config/existing-controller.yaml")).unwrap();
    let enabled = text.replace(
        "controller:\n  enabled: false\n  bindAddress: 0.0.0.0\n",
        &format!("controller:\n  enabled: true\n  bindAddress: {controller_bind}\n"),
    );
    assert_ne!(enabled, text, "the fixture's controller section moved");
    enabled.replace(
        "worker:\n  port: 8080\n",
        &format!("worker:\n{extra_worker}"),
    )
}

#[test]
fn a_worker_port_the_controller_on_the_same_host_binds_is_refused() {
    let check = |text: &str, overrides: &[Override]| {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        load(Some(file.path()), overrides, &[]).map(|c| c.node.port)
    };
    // The controller's own file, both ports 8080, the controller enabled on this host.
    let err = check(&controller_enabled("  port: 8080\n", "0.0.0.0"), &[])
        .unwrap_err()
        .to_string();
    insta::assert_snapshot!("shared_port", err);
    // Its dashboard port counts too.
    let err = check(&controller_enabled("  port: 8081\n", "0.0.0.0"), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("config key worker.port: 8081 is also controller.dashboardPort 8081"),
        "{err}"
    );
    // The fix the message names works, from the environment as from a flag.
    let fixed = env(&[("MLX_WORKER_PORT", "8090")]);
    assert_eq!(
        check(&controller_enabled("  port: 8080\n", "0.0.0.0"), &fixed).unwrap(),
        8090
    );
    let flag = [flag(Setting::Port, "--port", "8090")];
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), controller_enabled("  port: 8080\n", "0.0.0.0")).unwrap();
    assert_eq!(load(Some(file.path()), &[], &flag).unwrap().node.port, 8090);
    // The worker does not share the port when the controller does not run here, when the
    // system picks the worker's port, or when the two bind different addresses.
    let ok = [
        controller_enabled("  port: 8080\n", "0.0.0.0").replace("mode: both\n", "mode: worker\n"),
        controller_enabled("  port: 0\n", "0.0.0.0"),
        controller_enabled("  port: 8080\n  httpBindAddress: 127.0.0.1\n", "192.0.2.1"),
        controller_enabled("  port: 8080\n  httpBindAddress: '::1'\n", "127.0.0.1"),
    ];
    for text in ok {
        assert!(check(&text, &[]).is_ok(), "{text}");
    }
    // Without `mode`, the controller's default is both roles.
    let err = check(
        &controller_enabled("  port: 8080\n", "0.0.0.0").replace("mode: both\n", ""),
        &[],
    );
    assert!(err.is_err());
    // Overlapping addresses: the same one, or either side on every address of its family
    // (`::` takes IPv4 too, as dual-stack sockets do by default).
    let clash = [
        ("  port: 8080\n  httpBindAddress: 127.0.0.1\n", "127.0.0.1"),
        ("  port: 8080\n  httpBindAddress: 127.0.0.1\n", "0.0.0.0"),
        ("  port: 8080\n  httpBindAddress: 127.0.0.1\n", "'::'"),
        ("  port: 8080\n  httpBindAddress: '::'\n", "192.0.2.1"),
    ];
    for (worker, bind) in clash {
        assert!(
            check(&controller_enabled(worker, bind), &[]).is_err(),
            "{worker} {bind}"
        );
    }
    // A controller section the worker cannot read (the controller validates it) is no error.
    let odd = "controller:\n  enabled: true\n  port: eighty\n  bindAddress: [1]\n";
    assert_eq!(yaml(odd).unwrap().node.port, 8080);
    assert_eq!(yaml("controller: 8080\n").unwrap().node.port, 8080);
}

#[test]
fn the_example_worker_id_is_a_uuid_the_worker_accepts() {
    let text = std::fs::read_to_string(repo("config/cluster.yaml")).unwrap();
    let id = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("# workerId:"))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("config/cluster.yaml shows an example workerId");
    // The controller's schema expects a UUID.
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id} is not a UUID");
    let c = yaml(&format!("worker:\n  workerId: {id}\n")).unwrap();
    assert_eq!(c.node.worker_id.as_deref(), Some(id));
}

#[test]
fn a_runtime_command_and_environment_are_taken_as_given() {
    let defaults = yaml("").unwrap().engine;
    assert_eq!((defaults.command, defaults.env.len()), (None, 0));
    let c = yaml(
        "runtime:\n  command: [python3, -u, python/runtime.py, '--flag=a b']\n  env:\n    TMPDIR: /var/tmp/mlx\n    _A1: ''\n    N: 3\n",
    )
    .unwrap()
    .engine;
    assert_eq!(
        c.command.as_deref(),
        Some(&["python3", "-u", "python/runtime.py", "--flag=a b"].map(String::from)[..])
    );
    assert_eq!(
        c.env.into_iter().collect::<Vec<_>>(),
        vec![
            ("N".to_owned(), "3".to_owned()),
            ("TMPDIR".to_owned(), "/var/tmp/mlx".to_owned()),
            ("_A1".to_owned(), String::new())
        ]
    );
    let long = format!("runtime:\n  command: [{}]\n", vec!["a"; 65].join(", "));
    assert_eq!(
        yaml(&long).unwrap_err().to_string(),
        "config key runtime.command: has 65 words, at most 64"
    );
}
