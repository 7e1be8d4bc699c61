//! `opta doctor`: is everything opta needs there and answering? Each check says ok, warn or
//! fail, and what to do about a warn or fail. Exit 1 when any check fails. It starts nothing.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use serde_json::{Value, json};

use crate::daemon_ctl::{self, DaemonArgs};
use crate::{sanitize, ui};

/// How long each probe of the inference server may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Below this much free disk the store fails writes soon.
const DISK_FAIL_BYTES: u64 = 100 * 1024 * 1024;
/// Below this much free disk it is worth a warning.
const DISK_WARN_BYTES: u64 = 1024 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    status: Status,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            detail: detail.into(),
            hint: None,
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Warn,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Fail,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }
}

/// `config_problem`: why the settings file could not be used, if it could not.
pub async fn doctor(
    json: bool,
    home: &Path,
    daemon: &DaemonArgs,
    config_problem: Option<String>,
) -> Result<ExitCode> {
    let http = reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .build()
        .unwrap_or_else(|_| reqwest::Client::new());
    let config_file = crate::config::path(home);
    let config = match config_problem {
        Some(why) => Check::fail(
            "config",
            why,
            "fix it with `opta config set|unset KEY`, or edit the file",
        ),
        None if config_file.exists() => {
            Check::ok("config", format!("{} is valid", config_file.display()))
        }
        None => Check::ok("config", "no settings file (defaults, flags, environment)"),
    };
    let mut checks = vec![config, check_daemon(home).await];
    // The inference server the running daemon uses, when it can tell; else the configured one.
    let in_use = match daemon_ctl::running(home).await {
        Some(r) => r.client.lmx_status().await.ok().map(|s| s.url),
        None => None,
    };
    let lmx_url = in_use
        .as_deref()
        .unwrap_or(&daemon.lmx_url)
        .trim_end_matches('/');
    let models = list_models(&http, lmx_url).await;
    checks.push(match &models {
        Ok(_) => Check::ok("inference", format!("{lmx_url} answers")),
        Err(why) => Check::fail(
            "inference",
            format!("{lmx_url}: {why}"),
            "start your inference server, or point --lmx-url / OPTA_LMX_URL at it",
        ),
    });
    if let Ok(models) = &models {
        checks.push(Check::ok("server kind", server_kind(&http, lmx_url).await));
        checks.push(check_models(models, &daemon.model));
        if let Some(model) = pick_model(models, &daemon.model) {
            checks.push(check_tools(&http, lmx_url, &model).await);
        }
    }
    let health = match daemon_ctl::running(home).await {
        Some(r) => r.client.check_contract().await.ok(),
        None => None,
    };
    checks.push(check_sandbox(
        home,
        health.as_ref().and_then(|h| h.sandbox.clone()),
    ));
    checks.push(check_processes(
        health.as_ref().and_then(|h| h.processes.as_deref()),
    ));
    checks.push(check_disk(home));
    report(&checks, json)?;
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// How a command's processes are tracked to their end, as the running daemon says.
fn check_processes(kind: Option<&str>) -> Check {
    match kind {
        Some("cgroup") => Check::ok(
            "processes",
            "cgroup: each command runs in its own, and everything it started dies with it, setsid or not",
        ),
        Some("pid-namespace") => Check::ok(
            "processes",
            "pid-namespace: each command runs in its own, which ends with it and with the daemon; no cgroup, so memory is held by RLIMIT_AS",
        ),
        Some(other) => Check::warn(
            "processes",
            format!("{other}: a command that detaches (setsid) can outlive its stop"),
            "run the daemon where it can make cgroup v2 directories (as root, or in a systemd user slice with delegation), or allow user namespaces (sysctl user.max_user_namespaces)",
        ),
        None => Check::ok("processes", "reported by the daemon once it runs"),
    }
}

/// How commands are confined: the running daemon's answer, else this kernel's.
fn check_sandbox(home: &Path, kind: Option<String>) -> Check {
    let kind = kind.unwrap_or_else(|| {
        opta_daemon::process::sandbox::Sandbox::probe(home, Vec::new())
            .kind()
            .to_owned()
    });
    if kind == "landlock" {
        Check::ok(
            "sandbox",
            "landlock: commands write only in the workspace, the temp dir and --sandbox-write roots, and cannot read the daemon's home",
        )
    } else {
        Check::warn(
            "sandbox",
            format!("{kind}: this kernel has no Landlock, so commands run unconfined"),
            "use a Linux kernel with Landlock (5.13+, enabled in the `lsm=` boot list) to confine commands",
        )
    }
}

async fn check_daemon(home: &Path) -> Check {
    if let Some(r) = daemon_ctl::running(home).await {
        let detail = format!(
            "running at {} (pid {}, {})",
            r.client.base_url(),
            r.state.pid,
            r.state.daemon_id
        );
        return match r.client.check_contract().await {
            Ok(health) => Check::ok("daemon", format!("{detail}, version {}", health.version)),
            Err(e) => Check::fail(
                "daemon",
                format!("{detail}: {e}"),
                "upgrade whichever of opta and the daemon is older, then `opta daemon restart`",
            ),
        };
    }
    if daemon_ctl::lock_held(home) {
        return Check::fail(
            "daemon",
            "holds its lock but does not answer (hung or stopped)",
            "look at `opta daemon logs`; stop it (kill the pid in its state file) and start it again",
        );
    }
    Check::warn(
        "daemon",
        "not running",
        "`opta do` and `opta chat` start it; or `opta daemon start`",
    )
}

/// `GET /v1/models` ids, or why not.
async fn list_models(http: &reqwest::Client, base: &str) -> Result<Vec<String>, String> {
    let response = http
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .map_err(|e| describe(&e))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("/v1/models answered HTTP {status}"));
    }
    let body: Value = response
        .json()
        .await
        .map_err(|e| format!("/v1/models did not answer JSON: {e}"))?;
    let ids = body["data"]
        .as_array()
        .ok_or("/v1/models has no `data` list")?
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect();
    Ok(ids)
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("no answer within {} s", PROBE_TIMEOUT.as_secs())
    } else if e.is_connect() {
        "nothing answers there (connection refused or unreachable)".into()
    } else {
        e.to_string()
    }
}

/// What kind of server it is, as far as its routes tell.
async fn server_kind(http: &reqwest::Client, base: &str) -> String {
    let probes = [
        ("/admin/models", "Opta LMX (admin API)"),
        ("/api/tags", "Ollama"),
        ("/api/v0/models", "LM Studio"),
        ("/props", "llama.cpp server"),
        ("/version", "vLLM"),
    ];
    for (path, kind) in probes {
        let answered = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if answered {
            return kind.to_owned();
        }
    }
    "OpenAI-compatible (kind not recognised)".to_owned()
}

fn pick_model(models: &[String], wanted: &str) -> Option<String> {
    if wanted.is_empty() {
        return models.first().cloned();
    }
    models
        .iter()
        .find(|m| m.eq_ignore_ascii_case(wanted) || m.rsplit('/').next() == Some(wanted))
        .cloned()
        .or_else(|| models.first().cloned())
}

fn check_models(models: &[String], wanted: &str) -> Check {
    if models.is_empty() {
        return Check::fail(
            "models",
            "none loaded",
            "load one (`opta models load ID`, or in your server's UI)",
        );
    }
    let list = models.join(", ");
    if !wanted.is_empty() && !models.iter().any(|m| m.eq_ignore_ascii_case(wanted)) {
        return Check::warn(
            "models",
            format!("{list} loaded; the configured model {wanted:?} is not"),
            "load it, or set --model / OPTA_MODEL to a loaded one",
        );
    }
    Check::ok("models", format!("loaded: {list}"))
}

/// One small request with a tool attached: does the server take `tools` for this model?
async fn check_tools(http: &reqwest::Client, base: &str, model: &str) -> Check {
    let request = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Reply with OK."}],
        "tools": [{"type": "function", "function": {"name": "noop", "description": "Does nothing.",
            "parameters": {"type": "object", "properties": {}}}}],
        "max_tokens": 1,
        "stream": false,
    });
    let answer = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&request)
        .send()
        .await;
    match answer {
        Ok(r) if r.status().is_success() => {
            Check::ok("tools", format!("{model} accepts tool definitions"))
        }
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            let body: String = body.chars().take(160).collect();
            Check::warn(
                "tools",
                format!("{model}: HTTP {status} to a request with tools: {body}"),
                "the agent then reads tool calls from the model's text; a model with tool support works better",
            )
        }
        Err(e) => Check::warn(
            "tools",
            format!("{model}: {}", describe(&e)),
            "the probe could not finish; try again",
        ),
    }
}

fn check_disk(home: &Path) -> Check {
    // The home may not exist yet: ask about its nearest existing ancestor.
    let existing = home.ancestors().find(|p| p.exists()).unwrap_or(home);
    match nix::sys::statvfs::statvfs(existing) {
        Ok(stats) => {
            let free = stats
                .blocks_available()
                .saturating_mul(stats.fragment_size());
            let detail = format!("{} free at {}", human_gib(free), existing.display());
            if free < DISK_FAIL_BYTES {
                Check::fail(
                    "disk",
                    detail,
                    "free some space: the session store refuses writes on a full disk",
                )
            } else if free < DISK_WARN_BYTES {
                Check::warn("disk", detail, "little space left for the session store")
            } else {
                Check::ok("disk", detail)
            }
        }
        Err(e) => Check::warn(
            "disk",
            format!("cannot tell free space at {}: {e}", existing.display()),
            "check that the home directory is readable",
        ),
    }
}

fn human_gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

fn report(checks: &[Check], json: bool) -> Result<()> {
    if json {
        let ok = checks.iter().all(|c| c.status != Status::Fail);
        outln!("{}", json!({"ok": ok, "checks": checks}));
        return Ok(());
    }
    for check in checks {
        let label = match check.status {
            Status::Ok => console::style("ok  ").green(),
            Status::Warn => console::style("warn").yellow(),
            Status::Fail => console::style("fail").red().bold(),
        };
        // Details carry what servers said (model ids, versions, error bodies): printed
        // through the one gate, here, for every check.
        outln!(
            "{label}  {:<12} {}",
            check.name,
            sanitize::line(&check.detail)
        );
        if let Some(hint) = &check.hint {
            let hint = format!("→ {}", sanitize::line(hint));
            outln!("      {:<12} {}", "", ui::dim_out(&hint));
        }
    }
    Ok(())
}
