//! `opta`: the daemon's command line — run and manage the daemon, one-shot tasks, interactive
//! chat, sessions and models.

/// `println!` that returns the write error instead of panicking, so a closed stdout
/// (`opta sessions events ID | head -1`) ends the command quietly (see `is_broken_pipe`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)?
    }};
}

mod bg_cmd;
mod chat;
mod config;
mod daemon_cmd;
mod daemon_ctl;
mod do_cmd;
mod doctor_cmd;
mod markdown;
mod models_cmd;
mod render;
mod sanitize;
mod sessions_cmd;
mod ui;
mod web_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::daemon_ctl::DaemonArgs;

#[derive(Parser)]
#[command(name = "opta", version, about = "Local AI-agent hub: daemon and CLI")]
struct Cli {
    /// Home directory (default ~/.config/opta); daemon files go to HOME/daemon/.
    #[arg(
        long,
        env = "OPTA_HOME",
        global = true,
        help_heading = "Global options"
    )]
    home: Option<PathBuf>,
    #[command(flatten)]
    daemon: DaemonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run and manage the daemon.
    Daemon {
        #[command(subcommand)]
        action: daemon_cmd::DaemonAction,
    },
    /// Run one task in the current directory and stream the answer.
    Do(do_cmd::DoArgs),
    /// Chat interactively.
    Chat(chat::ChatArgs),
    /// List, inspect, cancel and delete sessions.
    Sessions {
        #[command(subcommand)]
        action: sessions_cmd::SessionsAction,
    },
    /// Background processes: list, start, logs [-f], kill.
    Bg {
        #[command(subcommand)]
        action: bg_cmd::BgAction,
    },
    /// List, load, unload, download and delete models on the inference server.
    Models {
        #[command(subcommand)]
        action: Option<models_cmd::ModelsAction>,
        /// Print JSON (before or after the subcommand).
        #[arg(long, global = true)]
        json: bool,
    },
    /// Read and change the settings file ($OPTA_HOME/config.toml).
    Config {
        #[command(subcommand)]
        action: config::ConfigAction,
    },
    /// Check the daemon, the inference server (kind, models, tool support) and disk space.
    Doctor {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Open the web client: prints a one-time sign-in link and opens it in a browser.
    Web(web_cmd::WebArgs),
    /// Print a shell completion script (`opta completions bash > /etc/bash_completion.d/opta`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; `opta man | man -l -`).
    Man,
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    ui::init_colours();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {}", sanitize::text(&format!("{e:#}")));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, &matches)) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => exit_code_for_broken_pipe(),
        Err(e) => {
            // Error chains carry what the daemon and the inference server said.
            eprintln!(
                "{} {}",
                ui::error_label(),
                sanitize::text(&format!("{e:#}"))
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(mut cli: Cli, matches: &clap::ArgMatches) -> Result<ExitCode> {
    let home = match cli.home {
        Some(h) => h,
        None => daemon_ctl::default_home()?,
    };
    // Absolute, so what the daemon records (its log path) means the same from anywhere.
    let home = std::path::absolute(&home)
        .with_context(|| format!("resolving the home directory {}", home.display()))?;
    // The settings file fills in what neither a flag nor the environment set. A broken file
    // stops every command but the ones that repair it.
    let repairs_config = matches!(
        cli.command,
        Command::Config {
            action: config::ConfigAction::Get { .. }
                | config::ConfigAction::Set { .. }
                | config::ConfigAction::Unset { .. }
        } | Command::Completions { .. }
            | Command::Man
    );
    // `doctor` reports a broken file as one of its checks rather than stopping.
    let mut config_problem = None;
    if matches!(cli.command, Command::Doctor { .. }) {
        config_problem = config::apply(&home, &mut cli.daemon, matches)
            .err()
            .map(|e| format!("{e:#}"));
    } else if !repairs_config {
        config::apply(&home, &mut cli.daemon, matches)?;
    }
    match cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "opta", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { action } => config::run(action, &home, &cli.daemon, matches),
        Command::Doctor { json } => {
            doctor_cmd::doctor(json, &home, &cli.daemon, config_problem).await
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut page)?;
            std::io::Write::write_all(&mut std::io::stdout(), &page)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Daemon { action } => daemon_cmd::run(action, &home, &cli.daemon).await,
        Command::Do(args) => do_cmd::run(args, &home, &cli.daemon).await,
        Command::Chat(args) => chat::run(args, &home, &cli.daemon).await,
        Command::Sessions { action } => sessions_cmd::sessions(action, &home, &cli.daemon).await,
        Command::Bg { action } => bg_cmd::bg(action, &home, &cli.daemon).await,
        Command::Web(args) => web_cmd::run(args, &home, &cli.daemon).await,
        Command::Models { action, json } => {
            models_cmd::models(action, json, &home, &cli.daemon).await
        }
    }
}

/// The reader of our output went away (`| head`): not an error to report.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// What a shell reports for a filter ended by SIGPIPE (128 + 13), without a message.
pub fn exit_code_for_broken_pipe() -> ExitCode {
    ExitCode::from(141)
}
