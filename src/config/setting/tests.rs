// Goal: each row of the settings table is consistent with itself and with the file: its value
// lands where its key does, its flag parses into its override, secrets never become flags.
// Method: for every row, the same example value once through the file (YAML built from the
// row's key) and once as an override, compared resolved; the flags parsed by the clap command
// built from the table.

use std::path::{Path, PathBuf};

use clap::{Args, FromArgMatches};

use crate::config::{ConfigError, Flags, Origin, Override, Setting, WorkerConfig, from_yaml, load};

/// An example text for a kind of value, by its help placeholder.
fn example(value_name: &str) -> &'static str {
    match value_name {
        "TEXT" => "w-1",
        "SECRET" => " s3cret ",
        "PATH" => "/nonexistent/example",
        "PATHS" => "/nonexistent/a:/nonexistent/b",
        "LIST" => "a/b, c/d",
        "PORT" => "4300",
        "N" => "7",
        "MS" => "1234",
        "0-100" => "42",
        "ADDR" => "::1",
        "embedded|external" => "external",
        "text|json" => "json",
        "true|false" => "false",
        "TOKENS" => "256",
        "BYTES" => "1048576",
        "queue-group|jetstream" => "jetstream",
        other => panic!("no example for values of kind {other}: add one here"),
    }
}

/// A file setting `key` (dotted) to `value`, written as YAML.
fn yaml_at(key: &str, value: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    let mut text = String::new();
    for (depth, part) in parts.iter().enumerate() {
        text.push_str(&"  ".repeat(depth));
        text.push_str(part);
        text.push(':');
        if depth + 1 == parts.len() {
            text.push(' ');
            text.push_str(value);
        }
        text.push('\n');
    }
    text
}

fn resolved(result: Result<WorkerConfig, ConfigError>) -> Result<WorkerConfig, String> {
    result.map_err(|e| e.to_string())
}

/// The file's spelling of `text` under `key`: quoted, plain or as a list, whichever the key
/// takes (a server list is one comma-separated string, tags are a YAML list).
fn through_the_file(key: &str, text: &str) -> Result<WorkerConfig, String> {
    let spellings = [format!("{text:?}"), text.to_owned(), format!("[{text}]")];
    let mut last = None;
    for spelling in spellings {
        match from_yaml(&yaml_at(key, &spelling), Path::new("t.yaml")) {
            Err(ConfigError::Yaml { message, .. }) => last = Some(message),
            other => return resolved(other),
        }
    }
    panic!("no spelling of {text:?} parses under {key}: {last:?}");
}

#[test]
fn a_setting_lands_where_its_key_does_in_the_file() {
    for setting in Setting::ALL {
        let text = example(setting.value_name());
        let from_file = through_the_file(setting.key(), text);
        let from_env = resolved(load(
            None,
            &[Override {
                setting,
                value: text.to_owned(),
                origin: Origin::Env(format!("MLX_WORKER_{}", setting.env_suffix())),
            }],
            &[],
        ));
        assert_eq!(from_env, from_file, "{setting:?} set to {text:?}");
        // The example differs from the default, so the setting did change something.
        assert_ne!(
            from_env,
            resolved(from_yaml("", Path::new("t.yaml"))),
            "{setting:?}"
        );
    }
}

fn parse_flags(args: &[&str]) -> Result<Flags, clap::Error> {
    let command = Flags::augment_args(clap::Command::new("t"));
    let matches = command.try_get_matches_from(std::iter::once("t").chain(args.iter().copied()))?;
    Flags::from_arg_matches(&matches)
}

#[test]
fn every_flag_parses_into_its_override() {
    Flags::augment_args(clap::Command::new("t")).debug_assert();
    let mut args = vec!["-c", "cluster.yaml"];
    let mut expected = Vec::new();
    let values: Vec<String> = Setting::ALL
        .iter()
        .map(|s| format!("{s:?}-value"))
        .collect();
    for (setting, value) in Setting::ALL.into_iter().zip(&values) {
        if let Some(flag) = setting.flag() {
            args.extend([flag, value.as_str()]);
            expected.push(Override {
                setting,
                value: value.clone(),
                origin: Origin::Flag(flag),
            });
        }
    }
    let flags = parse_flags(&args).unwrap();
    assert_eq!(flags.config, Some(PathBuf::from("cluster.yaml")));
    assert_eq!(flags.overrides, expected);
    assert_eq!(parse_flags(&[]).unwrap(), Flags::default());
    // A flag the table does not have is clap's error, not a silent no-op.
    assert!(parse_flags(&["--no-such-flag", "1"]).is_err());
}

#[test]
fn flags_are_distinct_long_flags_and_secrets_have_none() {
    let mut flags: Vec<&str> = Setting::ALL.iter().filter_map(|s| s.flag()).collect();
    assert!(
        flags
            .iter()
            .all(|f| f.starts_with("--") && *f != "--config"),
        "{flags:?}"
    );
    let count = flags.len();
    flags.sort_unstable();
    flags.dedup();
    assert_eq!(flags.len(), count, "a flag appears twice");
    // A flag's value shows in the process list; a secret comes from the environment or a file.
    for setting in Setting::ALL.into_iter().filter(|s| s.is_secret()) {
        assert_eq!(setting.flag(), None, "{setting:?}");
    }
}
