//! `opta web`: a one-time sign-in link to the daemon's web page, opened in a browser when
//! there is a display. The link carries a code that works once, for a minute, never the token.
//! The browser is not given the link itself: a command line is readable by every local
//! process (`/proc/PID/cmdline`), and one polling for it could redeem the code first. It gets
//! a redirect page written to the daemon's home (0600; sandboxed commands cannot read the
//! home), as Jupyter does; the link is printed too, for a browser that cannot open local
//! files.

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
                let page = redirect_page(home, &link.url)?;
                let opened = std::process::Command::new(program)
                    .arg(&page)
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

/// How long a redirect page is kept: past it, its code no longer works anyway.
const PAGE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(120);

/// Writes a page that sends the browser to `url` into the daemon's home, readable by its
/// owner only, and answers its path; pages of earlier runs past [`PAGE_LIFETIME`] are removed.
fn redirect_page(home: &Path, url: &str) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = opta_daemon::daemon::daemon_dir(home);
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let old = entry
            .file_name()
            .to_string_lossy()
            .starts_with("web-sign-in-")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > PAGE_LIFETIME));
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    // The name needs no secrecy (the directory is 0700, and the page is created exclusively,
    // never through a link planted there); the code is in the page, never in the name.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let path = dir.join(format!("web-sign-in-{}-{stamp}.html", std::process::id()));
    // The URL is the daemon's own (`http://host:port/#code=...`): no character in it needs
    // escaping in an attribute or a string, but it is escaped all the same.
    let escaped: String = url
        .chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '"' => "&quot;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '\\' | '\'' => format!("&#{};", u32::from(c)),
            c => c.to_string(),
        })
        .collect();
    let page = format!(
        "<!doctype html><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"0;url={escaped}\">\
         <title>opta</title><p><a href=\"{escaped}\">Open opta</a></p>\n"
    );
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(page.as_bytes())?;
    Ok(path)
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
