//! A short run of every benchmark, so they keep working. Not a measurement: no figure is
//! checked against a threshold, only that each run completes and reports its JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::process::Command;

/// What a successful `opta-bench ARGS` printed.
fn stdout_of(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_opta-bench"))
        .args(args)
        .output()
        .expect("opta-bench runs");
    assert!(
        out.status.success(),
        "opta-bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&stdout_of(args)).expect("a JSON report")
}

#[test]
fn every_benchmark_completes_a_short_run() {
    for (args, name) in [
        (
            &["overhead", "--turns", "5", "--warmup", "1"][..],
            "overhead",
        ),
        (&["tools", "--turns", "5", "--warmup", "1"][..], "tools"),
        (&["store", "--commits", "20"][..], "store"),
        (&["churn", "--rounds", "4", "--warmup", "2"][..], "churn"),
        (
            &["memory", "--sessions", "5", "--subscribers", "5"][..],
            "memory",
        ),
    ] {
        let report = run(args);
        assert_eq!(report["benchmark"], name, "{report}");
    }
}

/// Every line of the output is one JSON report of `name`.
fn run_lines(args: &[&str], name: &str) -> Vec<serde_json::Value> {
    let lines: Vec<serde_json::Value> = stdout_of(args)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON report per line"))
        .collect();
    assert!(!lines.is_empty(), "opta-bench {args:?} printed nothing");
    for line in &lines {
        assert_eq!(line["benchmark"], name, "{line}");
    }
    lines
}

#[test]
fn the_load_benchmarks_complete_a_short_run_and_see_every_seq() {
    for report in run_lines(
        &["fanout", "--subscribers", "3", "--tokens", "50,200"],
        "fanout",
    ) {
        assert_eq!(report["everySeqOnceInOrder"], true, "{report}");
    }
    for report in run_lines(
        &["concurrent", "--sessions", "4,8", "--tokens", "5"],
        "concurrent",
    ) {
        assert_eq!(report["everySeqOnceInOrder"], true, "{report}");
        assert_eq!(report["completed"], report["sessions"], "{report}");
    }
    let slow = run_lines(
        &[
            "slow-consumer",
            "--subscribers",
            "3",
            "--tokens",
            "100",
            "--stall-secs",
            "0",
        ],
        "slow-consumer",
    );
    assert_eq!(slow[0]["with"]["everySeqOnceInOrder"], true, "{}", slow[0]);
    let replay = run_lines(&["replay", "--events", "30", "--repeats", "3"], "replay");
    assert_eq!(replay[0]["storedEvents"], 30);
    let soak = run_lines(
        &[
            "soak",
            "--sessions",
            "3",
            "--subscribers",
            "2",
            "--duration-secs",
            "2",
            "--warmup-secs",
            "1",
            "--tokens",
            "5",
        ],
        "soak",
    );
    assert_eq!(soak[0]["errors"], 0, "{}", soak[0]);
    assert!(soak[0]["turnsSubmitted"].as_u64() >= Some(3), "{}", soak[0]);
    let startup = run_lines(
        &["startup", "--sessions", "0,20", "--repeats", "1"],
        "startup",
    );
    assert_eq!(startup.len(), 2);
}

/// A binary built beside `opta-bench`.
fn sibling(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_BIN_EXE_opta-bench")).with_file_name(name)
}

/// Kills the process when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--base`: the benchmarks measure a daemon they did not start, through the public protocol
/// only (here `opta daemon run` against the scripted server as its own process).
#[test]
fn the_benchmarks_measure_a_running_daemon_given_by_base_and_token() {
    use std::io::BufRead;
    let mut lmx = Killed(
        Command::new(sibling("opta-scripted-lmx"))
            .args(["--chunk-delay-ms", "0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect(
                "opta-scripted-lmx is built beside opta-bench (cargo build --workspace --bins)",
            ),
    );
    let mut lmx_url = String::new();
    std::io::BufReader::new(lmx.0.stdout.take().unwrap())
        .read_line(&mut lmx_url)
        .unwrap();
    let lmx_url = lmx_url.trim().to_owned();
    let home = tempfile::tempdir().unwrap();
    let token = "a&token#with+odd%chars";
    let daemon = Killed(
        Command::new(sibling("opta"))
            .args(["daemon", "run", "--port", "0", "--lmx-url", &lmx_url])
            .args(["--evict-idle-secs", "2", "--evict-scan-secs", "1"])
            .env("OPTA_HOME", home.path())
            .env("OPTA_TOKEN", token)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("opta is built beside opta-bench (cargo build --workspace --bins)"),
    );
    let state = home.path().join("daemon/state.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let port = loop {
        let port = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["port"].as_u64());
        if let Some(port) = port {
            break port;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon never wrote its port"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let base = format!("http://127.0.0.1:{port}");
    let pid = daemon.0.id().to_string();
    let remote = |args: &[&str]| -> Vec<String> {
        let mut all = vec![
            "--base", &base, "--token", token, "--pid", &pid, "--lmx", &lmx_url,
        ];
        all.extend_from_slice(args);
        all.into_iter().map(str::to_owned).collect()
    };
    let args = remote(&["fanout", "--subscribers", "3", "--tokens", "40"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let fanout = run_lines(&args, "fanout");
    assert_eq!(fanout[0]["everySeqOnceInOrder"], true, "{}", fanout[0]);
    assert!(fanout[0]["daemonCpuMs"].is_u64(), "{}", fanout[0]);
    let args = remote(&["overhead", "--turns", "3", "--warmup", "1"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let overhead = run(&args);
    assert!(
        overhead["firstTokenP50OverLmxFirstByteP50"].is_f64(),
        "{overhead}"
    );
    let args = remote(&[
        "memory",
        "--sessions",
        "3",
        "--subscribers",
        "3",
        "--eviction-wait-secs",
        "20",
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let memory = run(&args);
    assert_eq!(memory["evicted"], true, "{memory}");
    assert!(memory["rssIdleMib"].as_f64() > Some(1.0), "{memory}");
    // What cannot work against a running daemon says so.
    for args in [&["startup"][..], &["tools"][..], &["replay"][..]] {
        let all = remote(args);
        let out = Command::new(env!("CARGO_BIN_EXE_opta-bench"))
            .args(&all)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded with --base");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--base") || err.contains("--session"),
            "{args:?}: {err}"
        );
    }
    drop(daemon);
    drop(lmx);
}

/// A daemon that answers `/health` and then stalls (reads a request, never answers it) ends
/// the run within `--deadline-secs` with a message saying so; it does not hang the bench.
#[test]
fn a_target_that_stalls_fails_the_run_within_the_deadline() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut held = Vec::new();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            if head.starts_with(b"GET /health ") {
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                      content-length: 15\r\n\r\n{\"status\":\"ok\"}",
                );
            }
            // Every connection stays open, unanswered past /health.
            held.push(stream);
        }
    });
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_opta-bench"))
        .args(["--base", &base, "--token", "t", "--deadline-secs", "1"])
        .args(["overhead", "--turns", "1", "--warmup", "0"])
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("timed out") || stderr.contains("took longer"),
        "{stderr}"
    );
    assert!(
        took < std::time::Duration::from_secs(20),
        "the run took {took:?}"
    );
}
