//! One client's turns, back to back on one session: `overhead` (submit → 202, → first token,
//! → done, against the inference server's own time to first byte in the same run) and
//! `tools` (what one tool round adds to a turn).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::summary;
use crate::target::{Api, LocalDaemon, Target, TargetArgs, WsStream};

pub(crate) fn overhead(
    args: &TargetArgs,
    turns: usize,
    warmup: usize,
    sync_commits: bool,
) -> Result<()> {
    let target = Target::open(
        args,
        LocalDaemon {
            sync_commits,
            ..LocalDaemon::default()
        },
    )?;
    let result = target
        .block_on(measure(&target, turns, warmup))
        .map(|mut report| {
            if let Some(lmx) = &target.lmx {
                // With a warm preflight cache the whole run costs one model-list request.
                report["lmxModelListRequests"] = json!(lmx.model_list_requests());
                report["syncCommits"] = json!(sync_commits);
            }
            report
        });
    target.stop()?;
    println!("{}", serde_json::to_string_pretty(&result?)?);
    Ok(())
}

/// Reads `ws` until `turn.done` of `turn_id`: when its first token came (relative to
/// `start`), and when each `tool.start` / `tool.end` / first token after a tool did.
async fn watch(api: &Api, ws: &mut WsStream, turn_id: &str, start: Instant) -> Result<TurnTimes> {
    let mut times = TurnTimes::default();
    loop {
        let msg = api.next_message(ws).await?;
        let Message::Text(text) = msg else { continue };
        let v: Value = serde_json::from_str(text.as_str())?;
        if v["payload"]["turnId"] != turn_id {
            continue;
        }
        let now = Instant::now();
        match v["event"].as_str() {
            Some("turn.token") => {
                times.first_token.get_or_insert(now - start);
                if times.tool_end.is_some() {
                    times.token_after_tool.get_or_insert(now);
                }
            }
            Some("tool.start") => times.tool_start = Some(now),
            Some("tool.end") => times.tool_end = Some(now),
            Some("turn.done") => {
                times.done = now - start;
                return Ok(times);
            }
            Some("turn.error") => bail!("turn failed: {v}"),
            _ => {}
        }
    }
}

#[derive(Default)]
struct TurnTimes {
    first_token: Option<Duration>,
    done: Duration,
    tool_start: Option<Instant>,
    tool_end: Option<Instant>,
    token_after_tool: Option<Instant>,
}

async fn measure(target: &Target, turns: usize, warmup: usize) -> Result<Value> {
    let api = &target.api;
    let (session, mut ws) = api.subscribed_session(json!({})).await?;
    let mut submit_ack = Vec::with_capacity(turns);
    let mut first_token = Vec::with_capacity(turns);
    let mut done = Vec::with_capacity(turns);
    for i in 0..warmup + turns {
        let start = Instant::now();
        let turn_id = api.submit(&session, "ping").await?;
        let acked = start.elapsed();
        let times = watch(api, &mut ws, &turn_id, start).await?;
        if i >= warmup {
            submit_ack.push(acked);
            first_token.push(times.first_token.context("no token")?);
            done.push(times.done);
        }
    }
    api.delete_session(&session).await?;
    let mut report = json!({
        "benchmark": "overhead",
        "turns": turns,
        "warmup": warmup,
        "submitTo202Ms": summary(submit_ack),
        "submitToFirstTokenMs": summary(first_token.clone()),
        "submitToDoneMs": summary(done),
    });
    // The inference server alone: request → first streamed chunk.
    let Some(lmx_url) = &target.lmx_url else {
        report["lmxTimeToFirstByteMs"] = json!("not measured: give --lmx URL with --base");
        return Ok(report);
    };
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(target.api.deadline)
        .build()?;
    let mut lmx_first_byte = Vec::with_capacity(turns);
    for _ in 0..warmup + turns {
        let start = Instant::now();
        let resp = http
            .post(format!("{lmx_url}/v1/chat/completions"))
            .json(&json!({"model": "default", "stream": true,
                "messages": [{"role": "user", "content": "ping"}]}))
            .send()
            .await?;
        let mut body = resp.bytes_stream();
        body.next().await.context("no chunk")??;
        lmx_first_byte.push(start.elapsed());
        while body.next().await.is_some() {}
    }
    let lmx_first_byte = lmx_first_byte.split_off(warmup);
    let ratio = p50(&first_token) / p50(&lmx_first_byte);
    report["lmxTimeToFirstByteMs"] = summary(lmx_first_byte);
    report["firstTokenP50OverLmxFirstByteP50"] = json!((ratio * 100.0).round() / 100.0);
    Ok(report)
}

/// The median of `samples`, in seconds.
fn p50(samples: &[Duration]) -> f64 {
    let mut v = samples.to_vec();
    v.sort();
    v.get(v.len() / 2).map_or(f64::NAN, Duration::as_secs_f64)
}

pub(crate) fn tools(args: &TargetArgs, turns: usize, warmup: usize) -> Result<()> {
    let target = Target::open(args, LocalDaemon::default())?;
    let workspace = tempfile::tempdir()?;
    std::fs::write(workspace.path().join("notes.txt"), "alpha\nbeta\ngamma\n")?;
    let result = target.block_on(measure_tools(
        &target,
        &workspace.path().canonicalize()?,
        turns,
        warmup,
    ));
    target.stop()?;
    println!("{}", serde_json::to_string_pretty(&result?)?);
    Ok(())
}

async fn measure_tools(
    target: &Target,
    workspace: &std::path::Path,
    turns: usize,
    warmup: usize,
) -> Result<Value> {
    use opta_test_support::Reply;
    let lmx = target.scripted("tools")?;
    let api = &target.api;
    let (session, mut ws) = api
        .subscribed_session(json!({"metadata": {"workspace": workspace}}))
        .await?;
    let mut plain = Vec::with_capacity(turns);
    let mut with_tool = Vec::with_capacity(turns);
    let mut call = Vec::with_capacity(turns);
    let mut next_round = Vec::with_capacity(turns);
    for i in 0..(warmup + turns) * 2 {
        let tool_turn = i % 2 == 1;
        if tool_turn {
            lmx.push(Reply::tool_call("read_file", json!({"path": "notes.txt"})));
        }
        lmx.push(Reply::chunks(["ok"]));
        let start = Instant::now();
        let turn_id = api.submit(&session, "go").await?;
        let times = watch(api, &mut ws, &turn_id, start).await?;
        if i / 2 < warmup {
            continue;
        }
        if tool_turn {
            with_tool.push(times.done);
            let (s, e, t) = (
                times.tool_start.context("no tool.start")?,
                times.tool_end.context("no tool.end")?,
                times.token_after_tool.context("no token after the call")?,
            );
            call.push(e.duration_since(s));
            next_round.push(t.duration_since(e));
        } else {
            plain.push(times.done);
        }
    }
    let added = (p50(&with_tool) - p50(&plain)) * 1000.0;
    Ok(json!({
        "benchmark": "tools",
        "turns": turns,
        "warmup": warmup,
        "plainTurnSubmitToDoneMs": summary(plain),
        "toolTurnSubmitToDoneMs": summary(with_tool),
        "toolStartToEndMs": summary(call),
        "toolEndToNextTokenMs": summary(next_round),
        "addedPerToolRoundP50Ms": (added * 1000.0).round() / 1000.0,
        "lmxChatRequests": lmx.chat_requests(),
    }))
}
