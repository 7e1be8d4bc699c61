//! A short run of every benchmark, so they keep working. Not a measurement: no figure is
//! checked against a threshold, only that each run completes and reports its JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::process::Command;

fn run(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_opta-bench"))
        .args(args)
        .output()
        .expect("opta-bench runs");
    assert!(
        out.status.success(),
        "opta-bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON report")
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
