#!/usr/bin/env bash
# The main job: start a real inference server (llama.cpp serving SmolLM2-135M-Instruct, installed
# on first use by scripts/real-lmx.sh), then `opta do` a task: it starts the opta daemon on a
# fresh home and streams the answer here. Everything it needs is built or installed here.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p opta-cli
opta=$PWD/target/release/opta
export OPTA_HOME
OPTA_HOME=$(mktemp -d)
lmx_pid=
cleanup() {
  "$opta" daemon stop > /dev/null 2>&1 || true
  [ -n "$lmx_pid" ] && kill "$lmx_pid" 2> /dev/null || true
  rm -rf "$OPTA_HOME"
}
trap cleanup EXIT

read -r lmx_url lmx_pid < <(scripts/real-lmx.sh start)
echo "inference server: $lmx_url (SmolLM2-135M-Instruct)" >&2
# SmolLM2 may ramble to the end of its context: a reply stops at 512 tokens.
export OPTA_LMX_URL=$lmx_url OPTA_MODEL=smollm2-135m-instruct OPTA_MAX_TOKENS=512

"$opta" daemon start >&2
"$opta" do "${1:-Explain in one sentence what a local AI agent hub does.}"
"$opta" daemon status >&2
