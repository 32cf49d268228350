#!/usr/bin/env bash
# Make a real OpenAI-compatible LLM engine available on CPU for tests:
# llama-cpp-python's server (`python -m llama_cpp.server`).
#
# Prints the path of a python interpreter that can run it. Order of preference:
#   1. $FABRIC_TINY_ENGINE_PYTHON, when that python imports llama_cpp.server;
#   2. the cached venv ($FABRIC_CACHE_DIR, default ~/.cache/fabric-operator);
#   3. a build: llama.cpp compiled from the PyPI source package once as a wheel (~90 s on
#      2 cores), cached by version and flags, installed into a venv of its own so that
#      the server's dependencies never touch the project's .venv.
# Quiet on success: only the path goes to stdout; on failure the build log goes to stderr.
set -euo pipefail

VERSION=${FABRIC_TINY_ENGINE_VERSION:-0.3.36}
ROOT=${FABRIC_CACHE_DIR:-$HOME/.cache/fabric-operator}
PY=${PYTHON:-python3}

die() { printf 'get-tiny-engine: %s\n' "$*" >&2; exit 1; }

if [ -n "${FABRIC_TINY_ENGINE_PYTHON:-}" ]; then
  "$FABRIC_TINY_ENGINE_PYTHON" -c 'import llama_cpp.server' </dev/null >/dev/null 2>&1 \
    || die "FABRIC_TINY_ENGINE_PYTHON=$FABRIC_TINY_ENGINE_PYTHON cannot import llama_cpp.server"
  echo "$FABRIC_TINY_ENGINE_PYTHON"; exit 0
fi

# Why these flags: no multimodal part (LLAVA), portable code (no -march=native, so a
# cached wheel runs on another CPU), and no llama.cpp `common` library or HTTP server,
# which the Python package never loads. The package's CMakeLists forces
# LLAMA_BUILD_COMMON on, so a plain -D is ignored: a project include overrides it.
INCLUDE_LINE='set(LLAMA_BUILD_COMMON OFF)'
FLAGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_CCACHE=OFF"
KEY=$(printf '%s\n%s\n%s\n' "$VERSION" "$FLAGS" "$INCLUDE_LINE" | sha256sum | cut -c1-12)
WHEELS=$ROOT/wheels/llama-cpp-python-$VERSION-$KEY
HOME_DIR=$ROOT/tiny-engine-$VERSION-$KEY
VENV=$HOME_DIR/venv
READY=$VENV/.fabric-ready

if [ -f "$READY" ] && [ -x "$VENV/bin/python" ]; then echo "$VENV/bin/python"; exit 0; fi

mkdir -p "$HOME_DIR" "$WHEELS"
# One build at a time (parallel test sessions share the cache).
exec 9>"$HOME_DIR/.lock"
flock 9
if [ -f "$READY" ] && [ -x "$VENV/bin/python" ]; then echo "$VENV/bin/python"; exit 0; fi

LOG=$HOME_DIR/build.log
: >"$LOG"
fail() {
  printf 'get-tiny-engine: %s (log: %s)\n' "$*" "$LOG" >&2
  tail -n 40 "$LOG" >&2 || true
  exit 1
}
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

rm -rf "$VENV"
"$PY" -m venv "$VENV" </dev/null >>"$LOG" 2>&1 || fail "cannot create a venv with $PY"
VPY=$VENV/bin/python

wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/fabric-tiny-engine.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  printf '%s\n' "$INCLUDE_LINE" >"$WORK/no-common.cmake"
  start=$(date +%s)
  # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS, so it could hand back a wheel
  # built with other flags.
  CMAKE_ARGS="$FLAGS -DCMAKE_PROJECT_INCLUDE=$WORK/no-common.cmake" \
    "$VPY" -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
    -w "$WORK/out" "llama-cpp-python==$VERSION" </dev/null >>"$LOG" 2>&1 \
    || fail "building llama-cpp-python==$VERSION failed"
  printf 'built llama-cpp-python %s in %ss\n' "$VERSION" "$(( $(date +%s) - start ))" >>"$LOG"
  built=$(ls "$WORK"/out/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
  cp "$built" "$WHEELS/.tmp-$(basename "$built")"
  mv "$WHEELS/.tmp-$(basename "$built")" "$WHEELS/$(basename "$built")"
  wheel=$WHEELS/$(basename "$built")
fi

"$VPY" -m pip install -q "${wheel}[server]" </dev/null >>"$LOG" 2>&1 \
  || fail "installing $wheel[server] failed"
"$VPY" -c 'import llama_cpp.server' </dev/null >>"$LOG" 2>&1 \
  || fail "the installed engine cannot import llama_cpp.server"
touch "$READY"
echo "$VPY"
