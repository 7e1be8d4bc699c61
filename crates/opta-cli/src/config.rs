//! `$OPTA_HOME/config.toml`: every daemon setting under the name of its long flag
//! (`lmx-url = "http://127.0.0.1:8080"`). Precedence: flag > environment > file > default.
//! An unknown key or a bad value is an error that names the key, for every command: a broken
//! file never lets a daemon start on silent defaults. `opta config get|set|unset|list` edit it
//! with `toml_edit`, which keeps the user's comments and layout.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::ArgMatches;
use clap::Subcommand;
use clap::parser::ValueSource;
use toml_edit::{DocumentMut, Item, Value};

use crate::daemon_ctl::DaemonArgs;
use crate::sanitize;

/// What a key holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Port,
    Number,
    Switch,
}

/// Every key the file may hold: its name (the long flag), the clap argument id, its kind.
const KEYS: &[(&str, &str, Kind)] = &[
    ("host", "host", Kind::Text),
    ("port", "port", Kind::Port),
    ("token", "token", Kind::Text),
    ("lmx-url", "lmx_url", Kind::Text),
    ("model", "model", Kind::Text),
    ("preflight-ttl-ms", "preflight_ttl_ms", Kind::Number),
    (
        "lmx-connect-timeout-ms",
        "lmx_connect_timeout_ms",
        Kind::Number,
    ),
    (
        "lmx-first-byte-timeout-ms",
        "lmx_first_byte_timeout_ms",
        Kind::Number,
    ),
    ("lmx-idle-timeout-ms", "lmx_idle_timeout_ms", Kind::Number),
    (
        "lmx-first-token-timeout-ms",
        "lmx_first_token_timeout_ms",
        Kind::Number,
    ),
    ("lmx-admin-timeout-ms", "lmx_admin_timeout_ms", Kind::Number),
    ("max-db-mb", "max_db_mb", Kind::Number),
    ("evict-idle-secs", "evict_idle_secs", Kind::Number),
    ("evict-scan-secs", "evict_scan_secs", Kind::Number),
    ("max-tokens", "max_tokens", Kind::Number),
    ("max-tool-rounds", "max_tool_rounds", Kind::Number),
    (
        "permission-timeout-secs",
        "permission_timeout_secs",
        Kind::Number,
    ),
    ("max-command-secs", "max_command_secs", Kind::Number),
    ("system-prompt-file", "system_prompt_file", Kind::Text),
    ("workspace", "workspace", Kind::Text),
    ("default-mode", "default_mode", Kind::Text),
    ("max-background", "max_background", Kind::Number),
    (
        "background-timeout-secs",
        "background_timeout_secs",
        Kind::Number,
    ),
    (
        "background-output-kib",
        "background_output_kib",
        Kind::Number,
    ),
    ("background-keep-secs", "background_keep_secs", Kind::Number),
    ("sync-commits", "sync_commits", Kind::Switch),
    ("allow-any-workspace", "allow_any_workspace", Kind::Switch),
    ("command-max-procs", "command_max_procs", Kind::Number),
    (
        "command-max-memory-mb",
        "command_max_memory_mb",
        Kind::Number,
    ),
    ("command-tracking", "command_tracking", Kind::Text),
    ("tool-result-kib", "tool_result_kib", Kind::Number),
    ("max-edit-kib", "max_edit_kib", Kind::Number),
];

#[derive(Subcommand)]
pub enum ConfigAction {
    /// Print one key's value in the file.
    Get {
        /// The key (a long flag name, e.g. `lmx-url`).
        key: String,
    },
    /// Set a key in the file (comments and layout are kept).
    Set {
        /// The key.
        key: String,
        /// Its value.
        value: String,
    },
    /// Remove a key from the file.
    Unset {
        /// The key.
        key: String,
    },
    /// Every key with its value in effect.
    List {
        /// Also say where each value came from: flag, env, file or default.
        #[arg(long)]
        origin: bool,
    },
}

/// `home/config.toml`.
pub fn path(home: &Path) -> PathBuf {
    home.join("config.toml")
}

/// The key's name, clap id and kind; an unknown key is an error that lists the known ones.
fn kind_of(key: &str) -> Result<(&'static str, &'static str, Kind)> {
    KEYS.iter()
        .find(|(name, _, _)| *name == key)
        .copied()
        .with_context(|| {
            let known: Vec<&str> = KEYS.iter().map(|(name, _, _)| *name).collect();
            format!(
                "unknown config key {:?}; the keys are: {}",
                sanitize::line(key),
                known.join(", ")
            )
        })
}

/// Reads the file; a missing file is an empty one.
fn read(home: &Path) -> Result<DocumentMut> {
    let file = path(home);
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    text.parse::<DocumentMut>()
        .with_context(|| format!("{} is not valid TOML", file.display()))
}

/// A value of the file as the flag would take it, or an error naming the key.
fn flag_text(key: &str, kind: Kind, item: &Item) -> Result<String> {
    let bad = |what: &str| anyhow::anyhow!("config key {key}: {what}");
    match (kind, item.as_value()) {
        (Kind::Text, Some(Value::String(s))) => Ok(s.value().clone()),
        (Kind::Port, Some(Value::Integer(n))) => u16::try_from(*n.value())
            .map(|p| p.to_string())
            .map_err(|_| bad("must be a port number (0..=65535)")),
        (Kind::Number, Some(Value::Integer(n))) => u64::try_from(*n.value())
            .map(|v| v.to_string())
            .map_err(|_| bad("must be a non-negative integer")),
        (Kind::Switch, Some(Value::Boolean(b))) => Ok(b.value().to_string()),
        (Kind::Text, _) => Err(bad("must be a string")),
        (Kind::Port | Kind::Number, _) => Err(bad("must be an integer")),
        (Kind::Switch, _) => Err(bad("must be true or false")),
    }
}

/// The file's settings, checked: `(key, clap id, flag text)`.
fn settings(home: &Path) -> Result<Vec<(&'static str, &'static str, String)>> {
    let doc = read(home)?;
    let mut out = Vec::new();
    for (key, item) in doc.iter() {
        let (name, id, kind) =
            kind_of(key).with_context(|| format!("in {}", path(home).display()))?;
        let text =
            flag_text(key, kind, item).with_context(|| format!("in {}", path(home).display()))?;
        out.push((name, id, text));
    }
    Ok(out)
}

/// Gives `args` the file's values where neither a flag nor the environment set one.
pub fn apply(home: &Path, args: &mut DaemonArgs, matches: &ArgMatches) -> Result<()> {
    for (key, id, text) in settings(home)? {
        if matches!(
            source_of(matches, id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        set_field(args, key, &text)?;
    }
    Ok(())
}

/// Where clap took `id` from, looking into the subcommand that was run too (global flags may
/// be given after it).
fn source_of(matches: &ArgMatches, id: &str) -> Option<ValueSource> {
    let mut best = matches.value_source(id);
    let mut current = matches;
    while let Some((_, sub)) = current.subcommand() {
        if let Some(source) = sub.value_source(id)
            && best.is_none_or(|b| source > b)
        {
            best = Some(source);
        }
        current = sub;
    }
    best
}

fn set_field(args: &mut DaemonArgs, key: &str, text: &str) -> Result<()> {
    let number = || -> Result<u64> {
        text.parse()
            .with_context(|| format!("config key {key}: {text:?} is not a number"))
    };
    match key {
        "host" => args.host = text.to_owned(),
        "port" => {
            args.port = text
                .parse()
                .with_context(|| format!("config key {key}: {text:?} is not a port"))?;
        }
        "token" => args.token = Some(text.to_owned()),
        "lmx-url" => args.lmx_url = text.to_owned(),
        "model" => args.model = text.to_owned(),
        "preflight-ttl-ms" => args.preflight_ttl_ms = number()?,
        "lmx-connect-timeout-ms" => args.lmx_connect_timeout_ms = number()?,
        "lmx-first-byte-timeout-ms" => args.lmx_first_byte_timeout_ms = number()?,
        "lmx-idle-timeout-ms" => args.lmx_idle_timeout_ms = number()?,
        "lmx-first-token-timeout-ms" => args.lmx_first_token_timeout_ms = number()?,
        "lmx-admin-timeout-ms" => args.lmx_admin_timeout_ms = number()?,
        "max-db-mb" => args.max_db_mb = number()?,
        "evict-idle-secs" => args.evict_idle_secs = number()?.max(1),
        "evict-scan-secs" => args.evict_scan_secs = number()?.max(1),
        "max-tokens" => {
            args.max_tokens = u32::try_from(number()?)
                .with_context(|| format!("config key {key}: {text} is more than {}", u32::MAX))?;
        }
        "max-tool-rounds" => {
            args.max_tool_rounds = u32::try_from(number()?.max(1)).unwrap_or(u32::MAX)
        }
        "permission-timeout-secs" => args.permission_timeout_secs = number()?.max(1),
        "max-command-secs" => args.max_command_secs = number()?.max(1),
        "system-prompt-file" => args.system_prompt_file = Some(text.into()),
        "workspace" => args.workspace = Some(text.into()),
        "max-background" => args.max_background = number()?.max(1),
        "background-timeout-secs" => args.background_timeout_secs = number()?,
        "background-output-kib" => args.background_output_kib = number()?.max(1),
        "background-keep-secs" => args.background_keep_secs = number()?,
        "default-mode" => {
            args.default_mode = Some(
                crate::do_cmd::parse_mode(text)
                    .map_err(|e| anyhow::anyhow!("config key default-mode: {e}"))?,
            )
        }
        "sync-commits" => args.sync_commits = text == "true",
        "allow-any-workspace" => args.allow_any_workspace = text == "true",
        "command-max-procs" => args.command_max_procs = number()?,
        "command-max-memory-mb" => args.command_max_memory_mb = number()?,
        "tool-result-kib" => args.tool_result_kib = number()?.max(1),
        "max-edit-kib" => args.max_edit_kib = number()?.max(1),
        "command-tracking" => {
            args.command_tracking = text
                .parse()
                .map_err(|e| anyhow::anyhow!("config key command-tracking: {e}"))?
        }
        other => bail!("unknown config key {other:?}"),
    }
    Ok(())
}

fn get_field(args: &DaemonArgs, key: &str) -> String {
    match key {
        "host" => args.host.clone(),
        "port" => args.port.to_string(),
        "token" => args.token.as_ref().map_or("", |_| "(set)").to_owned(),
        "lmx-url" => args.lmx_url.clone(),
        "model" => args.model.clone(),
        "preflight-ttl-ms" => args.preflight_ttl_ms.to_string(),
        "lmx-connect-timeout-ms" => args.lmx_connect_timeout_ms.to_string(),
        "lmx-first-byte-timeout-ms" => args.lmx_first_byte_timeout_ms.to_string(),
        "lmx-idle-timeout-ms" => args.lmx_idle_timeout_ms.to_string(),
        "lmx-first-token-timeout-ms" => args.lmx_first_token_timeout_ms.to_string(),
        "lmx-admin-timeout-ms" => args.lmx_admin_timeout_ms.to_string(),
        "max-db-mb" => args.max_db_mb.to_string(),
        "evict-idle-secs" => args.evict_idle_secs.to_string(),
        "evict-scan-secs" => args.evict_scan_secs.to_string(),
        "max-tokens" => args.max_tokens.to_string(),
        "max-tool-rounds" => args.max_tool_rounds.to_string(),
        "permission-timeout-secs" => args.permission_timeout_secs.to_string(),
        "max-command-secs" => args.max_command_secs.to_string(),
        "system-prompt-file" => args
            .system_prompt_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        "workspace" => args
            .workspace
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        "max-background" => args.max_background.to_string(),
        "background-timeout-secs" => args.background_timeout_secs.to_string(),
        "background-output-kib" => args.background_output_kib.to_string(),
        "background-keep-secs" => args.background_keep_secs.to_string(),
        "default-mode" => args
            .default_mode
            .map(|m| m.as_str().to_owned())
            .unwrap_or_default(),
        "sync-commits" => args.sync_commits.to_string(),
        "allow-any-workspace" => args.allow_any_workspace.to_string(),
        "command-max-procs" => args.command_max_procs.to_string(),
        "command-max-memory-mb" => args.command_max_memory_mb.to_string(),
        "command-tracking" => args.command_tracking.as_str().to_owned(),
        "tool-result-kib" => args.tool_result_kib.to_string(),
        "max-edit-kib" => args.max_edit_kib.to_string(),
        _ => String::new(),
    }
}

/// `opta config ...`. `args` hold the values in effect (file applied).
pub fn run(
    action: ConfigAction,
    home: &Path,
    args: &DaemonArgs,
    matches: &ArgMatches,
) -> Result<ExitCode> {
    match action {
        ConfigAction::Get { key } => {
            kind_of(&key)?;
            let doc = read(home)?;
            match doc.get(&key) {
                Some(item) => {
                    let (_, _, kind) = kind_of(&key)?;
                    outln!("{}", sanitize::line(&flag_text(&key, kind, item)?));
                }
                None => return Ok(ExitCode::from(1)),
            }
        }
        ConfigAction::Set { key, value } => {
            let (_, _, kind) = kind_of(&key)?;
            let item = match kind {
                Kind::Text => toml_edit::value(value.as_str()),
                Kind::Port => {
                    toml_edit::value(i64::from(value.parse::<u16>().with_context(|| {
                        format!("config key {key}: {value:?} is not a port (0..=65535)")
                    })?))
                }
                Kind::Number => {
                    let n: u64 = value.parse().with_context(|| {
                        format!("config key {key}: {value:?} is not a non-negative integer")
                    })?;
                    toml_edit::value(
                        i64::try_from(n)
                            .with_context(|| format!("config key {key}: {value} is too large"))?,
                    )
                }
                Kind::Switch => toml_edit::value(value.parse::<bool>().with_context(|| {
                    format!("config key {key}: {value:?} is not true or false")
                })?),
            };
            // The value as the setting would take it (a mode's name, say) before it is kept.
            let mut probe = args.clone();
            set_field(&mut probe, &key, &value)?;
            let mut doc = read(home)?;
            doc[key.as_str()] = item;
            write(home, &doc)?;
        }
        ConfigAction::Unset { key } => {
            // Any key the file holds, known or not: this is how a stray key is removed.
            let mut doc = read(home)?;
            if doc.remove(&key).is_some() {
                write(home, &doc)?;
            } else {
                kind_of(&key)?;
            }
        }
        ConfigAction::List { origin } => {
            let in_file: Vec<&str> = settings(home)?.into_iter().map(|(k, _, _)| k).collect();
            for (key, id, _) in KEYS {
                let value = sanitize::line(&get_field(args, key)).into_owned();
                if origin {
                    let from = match source_of(matches, id) {
                        Some(ValueSource::CommandLine) => "flag",
                        Some(ValueSource::EnvVariable) => "env",
                        _ if in_file.contains(key) => "file",
                        _ => "default",
                    };
                    outln!("{key} = {value}  ({from})");
                } else {
                    outln!("{key} = {value}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the file (0600: it may hold the token), through a temporary file and a rename.
fn write(home: &Path, doc: &DocumentMut) -> Result<()> {
    std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    let file = path(home);
    let tmp = file.with_extension("toml.tmp");
    {
        use std::io::Write;
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        out.write_all(doc.to_string().as_bytes())?;
        out.sync_all()?;
    }
    std::fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}
