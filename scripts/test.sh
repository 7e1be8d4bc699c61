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

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

if [ "$fast" = 1 ]; then
  cargo nextest run --workspace
else
  read -r lmx_url lmx_pid < <(scripts/real-lmx.sh start)
  trap 'kill "$lmx_pid" 2>/dev/null || true' EXIT
  OPTA_REAL_LMX_URL="$lmx_url" OPTA_REAL_MODEL=smollm2-135m-instruct \
    cargo nextest run --workspace --run-ignored all
fi
cargo test --workspace --doc
