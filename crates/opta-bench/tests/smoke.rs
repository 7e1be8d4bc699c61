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
        (&["soak", "--rounds", "4", "--warmup", "2"][..], "soak"),
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
}
