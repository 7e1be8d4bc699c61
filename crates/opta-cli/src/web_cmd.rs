//! `opta web`: a one-time sign-in link to the daemon's web page, opened in a browser when
//! there is a display. The link carries a code that works once, for a minute, never the token
//! (a command line is readable by every local user).

use std::io::Write as _;
use std::path::Path;
use std::process::{ExitCode, Stdio};

use anyhow::{Context, Result};
use clap::Args;

use crate::daemon_ctl::{self, DaemonArgs};

#[derive(Args)]
pub struct WebArgs {
    /// Only print the link (its only line on stdout); do not open a browser.
    #[arg(long)]
    pub no_open: bool,
}

pub async fn run(args: WebArgs, home: &Path, daemon: &DaemonArgs) -> Result<ExitCode> {
    let client = daemon_ctl::ensure(home, daemon).await?;
    let link = client
        .web_sign_in_code()
        .await
        .context("asking the daemon for a sign-in code")?;
    // A closed stdout (`opta web --no-open | true`) is an error the caller reports quietly,
    // not a panic.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", link.url)?;
    stdout.flush()?;
    drop(stdout);
    if !args.no_open {
        match opener() {
            Some(program) => {
                // The browser gets the link on its command line for an instant; the code in it
                // works once, so a reader of /proc gains nothing after the page used it.
                let opened = std::process::Command::new(program)
                    .arg(&link.url)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn();
                if let Err(e) = opened {
                    eprintln!("could not run {program}: {e}; open the link above yourself");
                }
            }
            None => {
                eprintln!("no display here: open the link above in a browser (within a minute)")
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The program that opens a link in the user's browser, when there is a display to show it.
fn opener() -> Option<&'static str> {
    if cfg!(target_os = "macos") {
        return Some("open");
    }
    let display = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    display.then_some("xdg-open")
}
