//! `opta models [list] | load ID | unload ID | delete ID | download REPO | downloads`: the
//! inference server's models through the daemon's `/v3/lmx` routes. A load that needs a
//! download asks first (or takes `--yes`) and shows the download's progress.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use opta_client::DaemonClient;
use opta_protocol::{
    LmxDownload, LmxDownloadRequest, LmxLoadRequest, LmxLoadResponse, LmxUnloadResponse,
};

use crate::daemon_ctl::{self, DaemonArgs};
use crate::sanitize;
use crate::sessions_cmd::print_json;
use crate::ui;

/// How often a download's progress is asked for.
const PROGRESS_POLL: Duration = Duration::from_millis(500);

#[derive(Subcommand)]
pub enum ModelsAction {
    /// Loaded models (the default).
    List,
    /// Load a model (LMX servers); downloads it first if needed, after asking.
    Load {
        /// Model id.
        id: String,
        /// Download without asking when the model is not on the server's disk.
        #[arg(long, short)]
        yes: bool,
    },
    /// Unload a model (LMX servers).
    Unload {
        /// Model id.
        id: String,
    },
    /// Delete a model from the server's disk (LMX servers).
    Delete {
        /// Model id.
        id: String,
    },
    /// Download a model to the server's disk and follow the download (LMX servers).
    Download {
        /// Repository, for example `mlx-community/Qwen2.5-7B-Instruct-4bit`.
        repo: String,
    },
    /// Downloads, finished ones too (LMX servers).
    Downloads,
}

pub async fn models(
    action: Option<ModelsAction>,
    json: bool,
    home: &Path,
    daemon: &DaemonArgs,
) -> Result<ExitCode> {
    let client = daemon_ctl::ensure(home, daemon).await?;
    match action.unwrap_or(ModelsAction::List) {
        ModelsAction::List => {
            let models = client.lmx_models().await?;
            if json {
                return print_json(&models).map(|_| ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = models
                .models
                .iter()
                .map(|m| {
                    vec![
                        m.model_id.clone(),
                        m.status.clone(),
                        m.memory_bytes.map(human_bytes).unwrap_or_default(),
                        m.context_length.map(|c| c.to_string()).unwrap_or_default(),
                        m.loaded_at
                            .as_deref()
                            .map(|t| ui::ago(t, chrono::Utc::now()))
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            outln!(
                "{}",
                ui::table(&["MODEL", "STATE", "MEMORY", "CONTEXT", "LOADED"], &rows)
            );
            outln!(
                "{}",
                ui::dim(&format!("(from {} on the inference server)", models.source))
            );
        }
        ModelsAction::Load { id, yes } => {
            let answer = load(&client, &id, yes, json).await?;
            if json {
                return print_json(&answer).map(|_| ExitCode::SUCCESS);
            }
            let mut figures = Vec::new();
            if let Some(bytes) = answer.memory_bytes {
                figures.push(human_bytes(bytes));
            }
            if let Some(seconds) = answer.load_time_seconds {
                figures.push(format!("{seconds:.1} s"));
            }
            let figures = if figures.is_empty() {
                String::new()
            } else {
                format!(" ({})", figures.join(", "))
            };
            outln!("loaded {}{figures}", sanitize::line(&answer.model_id));
        }
        ModelsAction::Unload { id } => {
            report_removal("unloaded", &client.lmx_unload(&id).await?, json)?;
        }
        ModelsAction::Delete { id } => {
            report_removal("deleted", &client.lmx_delete_model(&id).await?, json)?;
        }
        ModelsAction::Download { repo } => {
            let request = LmxDownloadRequest {
                repo_id: repo,
                ..LmxDownloadRequest::default()
            };
            let started = client.lmx_download(&request).await?;
            let done = follow_download(&client, started, json).await?;
            if json {
                return print_json(&done).map(|_| ExitCode::SUCCESS);
            }
            outln!(
                "downloaded {}",
                sanitize::line(done.repo_id.as_deref().unwrap_or(&done.download_id))
            );
        }
        ModelsAction::Downloads => {
            let list = client.lmx_downloads(true).await?;
            if json {
                return print_json(&list).map(|_| ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = list
                .downloads
                .iter()
                .map(|d| {
                    vec![
                        d.download_id.clone(),
                        d.repo_id.clone().unwrap_or_default(),
                        d.status.clone(),
                        d.progress_percent
                            .map(|p| format!("{p:.0}%"))
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            outln!(
                "{}",
                ui::table(&["DOWNLOAD", "REPOSITORY", "STATE", "PROGRESS"], &rows)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints what an unload or delete did.
fn report_removal(verb: &str, answer: &LmxUnloadResponse, json: bool) -> Result<()> {
    if json {
        return print_json(answer);
    }
    let freed = answer
        .freed_bytes
        .map(|b| format!(" (freed {})", human_bytes(b)))
        .unwrap_or_default();
    outln!("{verb} {}{freed}", sanitize::line(&answer.model_id));
    Ok(())
}

/// Loads `id`: a `download_required` answer is confirmed (after asking, unless `yes`), a
/// download is followed to its end, then the model is loaded.
async fn load(client: &DaemonClient, id: &str, yes: bool, json: bool) -> Result<LmxLoadResponse> {
    let request = LmxLoadRequest {
        model_id: id.to_owned(),
        ..LmxLoadRequest::default()
    };
    let spinner = (!json)
        .then(|| ui::spinner(&format!("loading {id}…")))
        .flatten();
    let mut answer = client.lmx_load(&request).await;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    // A download may be asked about once, and followed once.
    for _ in 0..2 {
        let current = answer?;
        answer = match current.status.as_str() {
            "download_required" => {
                let Some(token) = current.confirmation_token.clone() else {
                    bail!("the server wants a download confirmed but sent no confirmation token");
                };
                let why = current
                    .message
                    .as_deref()
                    .unwrap_or("it is not on its disk");
                if !yes
                    && !ask(&format!(
                        "the server must download {id} first ({why}). Download?"
                    ))?
                {
                    bail!("not loaded: the download was declined (rerun with --yes to allow it)");
                }
                client.lmx_confirm_load(&token).await
            }
            "downloading" => {
                let Some(download_id) = current.download_id.clone() else {
                    bail!("the server is downloading {id} but sent no download id");
                };
                let started = client.lmx_download_progress(&download_id).await?;
                follow_download(client, started, json).await?;
                client.lmx_load(&request).await
            }
            _ => return finish_load(current),
        };
    }
    finish_load(answer?)
}

fn finish_load(answer: LmxLoadResponse) -> Result<LmxLoadResponse> {
    if answer.status == "loaded" {
        return Ok(answer);
    }
    let message = answer.message.as_deref().unwrap_or("no explanation");
    bail!(
        "the server answered {}: {}",
        sanitize::line(&answer.status),
        sanitize::line(message)
    )
}

/// Polls a download until it ends; a progress bar on terminals. Fails when it fails.
async fn follow_download(
    client: &DaemonClient,
    mut download: LmxDownload,
    json: bool,
) -> Result<LmxDownload> {
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(100);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos:>3}% {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(format!(
            "downloading {}",
            sanitize::line(download.repo_id.as_deref().unwrap_or(&download.download_id))
        ));
        bar
    });
    let mut last_reported = None;
    loop {
        let percent = download.progress_percent.unwrap_or(0.0).clamp(0.0, 100.0);
        match &bar {
            Some(bar) => bar.set_position(percent.round() as u64),
            None if !json => {
                // Off a terminal: a line per tenth, not one per poll.
                let tenth = (percent / 10.0).floor() as u64;
                if last_reported != Some(tenth) {
                    last_reported = Some(tenth);
                    eprintln!("{}", ui::dim(&progress_line(&download)));
                }
            }
            None => {}
        }
        match download.status.as_str() {
            "completed" | "complete" | "done" => break,
            "failed" | "error" | "cancelled" => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                let why = download.error.as_deref().unwrap_or("no reason given");
                bail!("the download failed: {}", sanitize::line(why));
            }
            _ => {}
        }
        tokio::time::sleep(PROGRESS_POLL).await;
        download = client.lmx_download_progress(&download.download_id).await?;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(download)
}

fn progress_line(d: &LmxDownload) -> String {
    let mut line = format!(
        "downloading {}: {:.0}%",
        sanitize::line(d.repo_id.as_deref().unwrap_or(&d.download_id)),
        d.progress_percent.unwrap_or(0.0)
    );
    if let (Some(done), Some(total)) = (d.downloaded_bytes, d.total_bytes) {
        line.push_str(&format!(
            " ({} of {})",
            human_bytes(done),
            human_bytes(total)
        ));
    }
    line
}

/// Asks a yes/no question on the terminal; `false` when stdin is not one.
fn ask(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Ok(false);
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(matches!(
        line.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// `1.5 GiB`, `512 MiB`, `900 B`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_bytes(900), "900 B");
        assert_eq!(human_bytes(1_610_612_736), "1.5 GiB");
        assert_eq!(human_bytes(512 * 1024 * 1024), "512.0 MiB");
    }
}
