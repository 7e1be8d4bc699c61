#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and end-to-end tests against the scripted
# inference server, and the end-to-end tests against a real model (llama.cpp + SmolLM2, installed
# on first use by scripts/real-lmx.sh). `scripts/test.sh --fast` skips the real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."

fast=0
[ "${1:-}" = "--fast" ] && fast=1

if ! cargo nextest --version > /dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

# playwright-core and tsc for the web client's tests (Chromium itself is Debian's: .ci/run installs it).
if [ ! -d tests/browser/node_modules/playwright-core ] \
  || [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
  npm ci --prefix tests/browser --no-audit --no-fund
fi

# The web client's modules, type-checked through their JSDoc types (strict).
tests/browser/node_modules/.bin/tsc -p tests/browser
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Every binary, not only those the tests' own packages build: the benchmark smoke tests run
# `opta` and `opta-scripted-lmx` beside `opta-bench`.
cargo build --workspace --bins

if [ "$fast" = 1 ]; then
  cargo nextest run --workspace
else
  read -r lmx_url lmx_pid < <(scripts/real-lmx.sh start)
  trap 'kill "$lmx_pid" 2>/dev/null || true' EXIT
  OPTA_REAL_LMX_URL="$lmx_url" OPTA_REAL_MODEL=smollm2-135m-instruct \
    cargo nextest run --workspace --run-ignored all
fi
cargo test --workspace --doc
