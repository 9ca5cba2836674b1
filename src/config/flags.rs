//! The command line's part of the configuration: `--config` and one flag per [`Setting`] that
//! has one, as a [`clap::Args`] built at run time from the settings table, so every command
//! that takes a configuration takes the same flags and a new row needs nothing here.
//!
//! clap only collects the text; the values are checked where the environment's are, when the
//! configuration is resolved, so a bad flag is an invalid configuration (exit 64) that names
//! the flag.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};

use super::{
    ConfigError, ENV_CONFIG_FILE, ENV_PREFIX, Origin, Override, Setting, WorkerConfig,
    environment_overrides, load, read_environment,
};

/// The id of the `--config` argument.
const CONFIG: &str = "config";

/// The configuration file and the settings given as flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    /// The file given with `--config` (`-c`), if any.
    pub config: Option<PathBuf>,
    /// One override per setting flag given, in table order.
    pub overrides: Vec<Override>,
}

impl Flags {
    /// Resolves the configuration: the file (`--config`, else `MLX_WORKER_CONFIG`), then the
    /// `MLX_WORKER_*` environment (read here, once), then these flags.
    pub fn resolve(&self) -> Result<WorkerConfig, ConfigError> {
        let env = read_environment();
        let file = self.config.clone().or_else(|| {
            env.iter()
                .find(|(k, _)| k == ENV_CONFIG_FILE)
                .map(|(_, v)| PathBuf::from(v))
        });
        let env_overrides = environment_overrides(&env)?;
        load(file.as_deref(), &env_overrides, &self.overrides)
    }
}

/// The argument id of a flag: its name without the dashes.
fn id(flag: &'static str) -> &'static str {
    flag.trim_start_matches('-')
}

fn flag_arg(setting: Setting, flag: &'static str) -> Arg {
    Arg::new(id(flag))
        .long(id(flag))
        .action(ArgAction::Set)
        .value_name(setting.value_name())
        .help(setting.help())
        .long_help(format!(
            "{}\n[key: {}] [env: {ENV_PREFIX}{}]",
            setting.help(),
            setting.key(),
            setting.env_suffix()
        ))
}

/// The settings without a flag (secrets among them), listed after the flags.
fn environment_only() -> String {
    let mut text = String::from("Settings from the environment only:");
    for setting in Setting::ALL.into_iter().filter(|s| s.flag().is_none()) {
        let _ = write!(
            text,
            "\n  {ENV_PREFIX}{}\n          {}\n          [key: {}]",
            setting.env_suffix(),
            setting.help(),
            setting.key()
        );
    }
    text
}

impl Args for Flags {
    fn augment_args(cmd: Command) -> Command {
        let config = Arg::new(CONFIG)
            .long(CONFIG)
            .short('c')
            .action(ArgAction::Set)
            .value_name("PATH")
            .value_parser(clap::value_parser!(PathBuf))
            .help("Configuration file (YAML)")
            .long_help(format!(
                "Configuration file (YAML)\n[env: {ENV_CONFIG_FILE}]"
            ));
        Setting::ALL
            .into_iter()
            .filter_map(|s| s.flag().map(|flag| flag_arg(s, flag)))
            .fold(cmd.arg(config), Command::arg)
            .after_long_help(environment_only())
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for Flags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = Flags::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        let wrong = |e| clap::Error::raw(ErrorKind::InvalidValue, e);
        if let Some(path) = matches.try_get_one::<PathBuf>(CONFIG).map_err(wrong)? {
            self.config = Some(path.clone());
        }
        for setting in Setting::ALL {
            let Some(flag) = setting.flag() else { continue };
            if let Some(value) = matches.try_get_one::<String>(id(flag)).map_err(wrong)? {
                self.overrides.push(Override {
                    setting,
                    value: value.clone(),
                    origin: Origin::Flag(flag),
                });
            }
        }
        Ok(())
    }
}
