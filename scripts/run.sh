#!/usr/bin/env bash
# The main job: start a real inference server (llama.cpp serving SmolLM2-135M-Instruct, installed
# on first use by scripts/real-lmx.sh) and the opta daemon on a fresh home, then run one real turn
# streamed to this terminal over the v3 SSE plane. Everything it needs is built or installed here.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p opta-cli
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

read -r lmx_url lmx_pid < <(scripts/real-lmx.sh start)
pids+=("$lmx_pid")
echo "inference server: $lmx_url (SmolLM2-135M-Instruct)" >&2

OPTA_HOME="$work/home" OPTA_LMX_URL="$lmx_url" OPTA_MODEL=smollm2-135m-instruct ./target/release/opta daemon run --port 0 2> "$work/daemon.err" &
pids+=($!)
state="$work/home/daemon/state.json"
for _ in $(seq 100); do [ -s "$state" ] && break; sleep 0.1; done
[ -s "$state" ] || { cat "$work/daemon.err" >&2; exit 1; }
read -r port token < <(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["port"], s["token"])' "$state")
base="http://127.0.0.1:$port"
echo "daemon: $base" >&2

task=${1:-"Explain in one sentence what a local AI agent hub does."}
curl -fsS -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -d '{"sessionId":"demo"}' "$base/v3/sessions" > /dev/null
# Follow the session's events; print tokens as they arrive, stop at the terminal event.
curl -fsSN -H "Authorization: Bearer $token" "$base/v3/sse/events?sessionId=demo&afterSeq=1" 2>/dev/null \
  | python3 -u -c '
import json, sys
for line in sys.stdin:
    if not line.startswith("data: "):
        continue
    env = json.loads(line[6:])
    kind, p = env["event"], env["payload"]
    if kind == "turn.token":
        print(p["text"], end="", flush=True)
    elif kind == "turn.done":
        print("\n[done] %s tokens in %.3f s" % (p["stats"]["tokens"], p["stats"]["elapsed"]), file=sys.stderr)
        break
    elif kind == "turn.error":
        print("\n[error] %s: %s" % (p.get("code"), p["message"]), file=sys.stderr)
        sys.exit(1)
' &
follower=$!
jq_body=$(python3 -c 'import json,sys; print(json.dumps({"clientId":"run.sh","writerId":"run.sh","content":sys.argv[1],"mode":"do"}))' "$task")
curl -fsS -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -d "$jq_body" "$base/v3/sessions/demo/turns" > /dev/null
wait "$follower"
