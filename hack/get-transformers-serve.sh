#!/usr/bin/env bash
# Make Hugging Face Transformers' OpenAI-compatible server (`transformers serve`) available
# on CPU for tests, in a venv of its own (never the project's .venv: torch alone is ~1 GB).
#
# Prints the path of a python interpreter whose bin/ has `transformers`. In order:
#   1. $FABRIC_TRANSFORMERS_PYTHON, when that python imports transformers.cli.serve;
#   2. the cached venv ($FABRIC_CACHE_DIR, default ~/.cache/fabric-operator);
#   3. a fresh venv: transformers[serving] from PyPI and torch's CPU build (~50 s, 1.2 GB).
#
# torch is pinned to its CPU build (`2.13.0+cpu`): PyPI's own Linux torch is the CUDA one
# (several GB of nvidia-* wheels), which must never be downloaded. pip finds the CPU wheel
# where the host's pip configuration points (find-links: /opt/wheels on these machines);
# where it cannot, this fails saying so.
# Quiet on success: only the path goes to stdout; on failure the log's tail goes to stderr.
set -euo pipefail

VERSION=${FABRIC_TRANSFORMERS_VERSION:-5.25.0}
TORCH=${FABRIC_TORCH_VERSION:-2.13.0+cpu}
ROOT=${FABRIC_CACHE_DIR:-$HOME/.cache/fabric-operator}
PY=${PYTHON:-python3}

die() { printf 'get-transformers-serve: %s\n' "$*" >&2; exit 1; }

if [ -n "${FABRIC_TRANSFORMERS_PYTHON:-}" ]; then
  "$FABRIC_TRANSFORMERS_PYTHON" -c 'import transformers.cli.serve' </dev/null >/dev/null 2>&1 \
    || die "FABRIC_TRANSFORMERS_PYTHON=$FABRIC_TRANSFORMERS_PYTHON cannot import transformers.cli.serve"
  echo "$FABRIC_TRANSFORMERS_PYTHON"; exit 0
fi

case $TORCH in *+cpu) ;; *) die "torch must be a CPU build (+cpu), not $TORCH" ;; esac
KEY=$(printf '%s\n%s\n' "$VERSION" "$TORCH" | sha256sum | cut -c1-12)
HOME_DIR=$ROOT/transformers-serve-$VERSION-$KEY
VENV=$HOME_DIR/venv
READY=$VENV/.fabric-ready

if [ -f "$READY" ] && [ -x "$VENV/bin/python" ]; then echo "$VENV/bin/python"; exit 0; fi

mkdir -p "$HOME_DIR"
exec 9>"$HOME_DIR/.lock" # one build at a time (parallel sessions share the cache)
flock 9
if [ -f "$READY" ] && [ -x "$VENV/bin/python" ]; then echo "$VENV/bin/python"; exit 0; fi

LOG=$HOME_DIR/build.log
: >"$LOG"
fail() {
  printf 'get-transformers-serve: %s (log: %s)\n' "$*" "$LOG" >&2
  tail -n 40 "$LOG" >&2 || true
  exit 1
}
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

rm -rf "$VENV"
"$PY" -m venv "$VENV" </dev/null >>"$LOG" 2>&1 || fail "cannot create a venv with $PY"
VPY=$VENV/bin/python
start=$(date +%s)
# torch first and alone: if pip cannot find the CPU wheel, nothing else is fetched.
"$VPY" -m pip install -q "torch==$TORCH" </dev/null >>"$LOG" 2>&1 ||
  fail "no torch==$TORCH wheel where pip looks (its find-links / index): put the CPU wheel there"
"$VPY" -m pip install -q "torch==$TORCH" "transformers[serving]==$VERSION" </dev/null >>"$LOG" 2>&1 ||
  fail "installing transformers[serving]==$VERSION failed"
"$VPY" -c 'import torch, transformers.cli.serve; assert torch.version.cuda is None, torch.version.cuda' \
  </dev/null >>"$LOG" 2>&1 || fail "the venv cannot import transformers.cli.serve with a CPU torch"
printf 'installed transformers %s and torch %s in %ss\n' "$VERSION" "$TORCH" "$(($(date +%s) - start))" >>"$LOG"
touch "$READY"
echo "$VPY"
