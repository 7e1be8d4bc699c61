//! `opta`: the command-line entry point. For now it runs the daemon in the foreground.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use opta_daemon::context::Tunables;
use opta_daemon::inference::LmxTimeouts;
use opta_daemon::{DaemonConfig, RunningDaemon};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Parser)]
#[command(name = "opta", version, about = "Local AI-agent hub: daemon and CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the daemon.
    Daemon {
        #[command(subcommand)]
        action: DaemonAction,
    },
}

#[derive(Subcommand)]
enum DaemonAction {
    /// Serve in the foreground until SIGINT/SIGTERM.
    Run(DaemonArgs),
}

#[derive(Args, Debug)]
struct DaemonArgs {
    /// Address to bind; anything but loopback exposes the daemon to the network.
    #[arg(long, env = "OPTA_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port (9999 falls back to 10000..=10020 when taken; 0 takes any free port).
    #[arg(long, env = "OPTA_PORT", default_value_t = opta_daemon::daemon::DEFAULT_PORT)]
    port: u16,
    /// Home directory (default ~/.config/opta); daemon files go to HOME/daemon/.
    #[arg(long, env = "OPTA_HOME")]
    home: Option<PathBuf>,
    /// Auth token (default: a new random one, written to the state file).
    #[arg(long, env = "OPTA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Base URL of the OpenAI-compatible inference server.
    #[arg(long, env = "OPTA_LMX_URL", default_value = "http://127.0.0.1:1234")]
    lmx_url: String,
    /// Model for new sessions (default: the inference server's first loaded model).
    #[arg(long, env = "OPTA_MODEL", default_value = "")]
    model: String,
    /// How long the inference server's model list is cached, in milliseconds.
    #[arg(long, env = "OPTA_PREFLIGHT_TTL_MS", default_value_t = 10_000)]
    preflight_ttl_ms: u64,
    /// Inference connect timeout in milliseconds.
    #[arg(long, env = "OPTA_LMX_CONNECT_TIMEOUT_MS", default_value_t = 5_000)]
    lmx_connect_timeout_ms: u64,
    /// Inference time-to-first-byte timeout in milliseconds.
    #[arg(
        long,
        env = "OPTA_LMX_FIRST_BYTE_TIMEOUT_MS",
        default_value_t = 120_000
    )]
    lmx_first_byte_timeout_ms: u64,
    /// Longest silence between two streamed chunks, in milliseconds.
    #[arg(long, env = "OPTA_LMX_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    lmx_idle_timeout_ms: u64,
    /// Timeout of model-list and admin requests, in milliseconds.
    #[arg(long, env = "OPTA_LMX_ADMIN_TIMEOUT_MS", default_value_t = 10_000)]
    lmx_admin_timeout_ms: u64,
}

fn default_home() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set; pass --home or OPTA_HOME")?;
    Ok(PathBuf::from(home).join(".config").join("opta"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Daemon {
            action: DaemonAction::Run(args),
        } => runtime.block_on(run_daemon(args)),
    }
}

async fn run_daemon(args: DaemonArgs) -> Result<()> {
    let home = match args.home {
        Some(h) => h,
        None => default_home()?,
    };
    let dir = opta_daemon::daemon::daemon_dir(&home);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let logs_path = dir.join("daemon.log");
    let state_file = opta_daemon::state_path(&home);
    let file_appender = tracing_appender::rolling::never(&dir, "daemon.log");
    let (file_writer, _flush_guard) = tracing_appender::non_blocking(file_appender);
    tracing_subscriber::registry()
        .with(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(file_writer),
        )
        .init();

    let config = DaemonConfig {
        host: args.host,
        port: args.port,
        home,
        token: args.token,
        lmx_url: args.lmx_url,
        model: args.model,
        lmx_timeouts: LmxTimeouts {
            connect: Duration::from_millis(args.lmx_connect_timeout_ms),
            first_byte: Duration::from_millis(args.lmx_first_byte_timeout_ms),
            idle: Duration::from_millis(args.lmx_idle_timeout_ms),
            admin: Duration::from_millis(args.lmx_admin_timeout_ms),
        },
        preflight_ttl: Duration::from_millis(args.preflight_ttl_ms),
        limits: Tunables::default(),
        logs_path: Some(logs_path),
    };
    let daemon = RunningDaemon::start(config).await?;
    let state = daemon.state();
    eprintln!(
        "opta daemon {} listening on http://{}:{} (state file: {})",
        state.daemon_id,
        state.host,
        state.port,
        state_file.display()
    );
    wait_for_signal().await?;
    tracing::info!("signal received; shutting down");
    daemon.shutdown().await?;
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
