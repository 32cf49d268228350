#!/usr/bin/env bash
# Build the container images a real local Kubernetes node (containerd) needs, on machines
# where no container registry is reachable and there is no Docker engine: podman builds
# from Debian's archive, PyPI and the project's own files (shared/notes/real-node.md).
#
#   hack/get-images.sh [pause|operator|engine|transformers ...]     (default: all four)
#
# stdout, one line per image asked for:  ROLE IMAGE_REF ARCHIVE_PATH
#   ARCHIVE_PATH is an OCI archive (`podman save --format oci-archive`) in the cache, ready
#   for `ctr -n k8s.io images import ARCHIVE_PATH`; pods use IMAGE_REF with
#   imagePullPolicy Never (or IfNotPresent).
# Images (hack/images/ holds each one's build context):
#   base      localhost/python:3.11-slim-bookworm: debootstrap minbase + python3, a stand-in
#             for the official python:*-slim (not printed: the other two build on it)
#   pause     localhost/fabric-pause:3.9: a static pause binary, FROM scratch
#   operator  localhost/fabric-operator:<pyproject version>: the project's own Dockerfile
#   engine    localhost/fabric-llama-server:<llama-cpp-python version>-<key>: llama-server's
#             CLI on llama-cpp-python's server, CPU, with a tiny GGUF baked in
#   transformers  localhost/fabric-transformers-serve:<transformers version>-<key>:
#             `transformers serve` with torch's CPU build (the versions of
#             hack/get-transformers-serve.sh's venv), a tiny Qwen2 model baked in
#             (/app/models/tiny); ~1 GB, the e2e suite's tests/e2e/test_transformers_in_cluster.py
# Cached: an image is rebuilt only when its inputs change (key = sha256 of the inputs, in
# the archive's name and the image's dev.fabric.inputs label). Quiet on success: progress
# lines go to stderr only while building; build logs are in $CACHE/images/logs.
# podman's storage and config are the project's own (never the system's): storage under
# $CACHE/podman, config hack/images/containers.conf (written to $CACHE/podman with the
# cache's paths); `eval "$(hack/get-images.sh --env)"` sets up a shell to run podman on the
# same storage by hand (a `podman run` there still creates /libpod_parent cgroups, and one
# without --network host a cni-podman0 bridge, iptables chains and /var/lib/cni).
# A build leaves nothing outside the cache: no /etc/cni/net.d/cni.lock (network_config_dir),
# no /run/runc (runc's --root), no /var/lib/containers (removed at exit, below). RUN steps
# run in a cgroup of their own that runc removes (never libpod_parent: that is conmon's,
# for `podman run`).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
CTX=$HERE/images
CACHE=${FABRIC_CACHE_DIR:-$HOME/.cache/fabric-operator}
OUT=$CACHE/images
PODMAN_DIR=$CACHE/podman
PY=${FABRIC_PYTHON:-$REPO/.venv/bin/python}
SUITE=bookworm
BASE_REF=localhost/python:3.11-slim-bookworm
BASE_PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
PAUSE_REF=localhost/fabric-pause:3.9

log() { printf 'get-images: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
sha() { sha256sum | cut -c1-64; }

export CONTAINERS_CONF=$PODMAN_DIR/containers.conf
export CONTAINERS_REGISTRIES_CONF=$CTX/registries.conf
export CONTAINERS_STORAGE_CONF=$PODMAN_DIR/storage.conf
# The template plus network_config_dir, which takes only an absolute path: any podman code
# path that reads it instead of --network-config-dir (pm, below) would otherwise create
# /etc/cni/net.d/cni.lock. Rewritten on every run (--env too), renamed into place.
mkdir -p "$PODMAN_DIR"
{
  cat "$CTX/containers.conf"
  printf '\n[network]\nnetwork_config_dir = "%s"\n' "$PODMAN_DIR/cni"
} >"$CONTAINERS_CONF.$$"
mv -f "$CONTAINERS_CONF.$$" "$CONTAINERS_CONF"
if [ "${1:-}" = --env ]; then
  printf 'export CONTAINERS_CONF=%q CONTAINERS_REGISTRIES_CONF=%q CONTAINERS_STORAGE_CONF=%q\n' \
    "$CONTAINERS_CONF" "$CONTAINERS_REGISTRIES_CONF" "$CONTAINERS_STORAGE_CONF"
  printf 'podman() { command podman --tmpdir %q --network-config-dir %q "$@"; }\n' \
    "$PODMAN_DIR/tmp" "$PODMAN_DIR/cni"
  exit 0
fi

roles=("$@")
[ ${#roles[@]} -gt 0 ] || roles=(pause operator engine transformers)
for r in "${roles[@]}"; do
  case $r in
    pause | operator | engine | transformers) ;;
    *) die "unknown role $r (pause, operator, engine, transformers)" ;;
  esac
done

# ---- tools (Debian's archive; the system's apt configuration is used as it is) ----------
# shellcheck source-path=SCRIPTDIR source=lib/k8s-source.sh
. "$HERE/lib/k8s-source.sh"
# podman (with runc, see containers.conf), debootstrap for the base, gcc + libc6-dev for
# the static pause binary.
# PKG:CMD: a command already there (containerd.io's runc, say) is not installed again.
k8s_apt_install podman:podman runc:runc debootstrap:debootstrap gcc:gcc libc6-dev

mkdir -p "$OUT/logs" "$PODMAN_DIR"
exec 9>"$OUT/.lock"
flock 9 # one run at a time: builds and archives are shared

if [ ! -f "$CONTAINERS_STORAGE_CONF" ]; then
  printf '# written by hack/get-images.sh\n[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n' \
    "$PODMAN_DIR/storage" "$PODMAN_DIR/run" >"$CONTAINERS_STORAGE_CONF"
fi
pm() { podman --tmpdir "$PODMAN_DIR/tmp" --network-config-dir "$PODMAN_DIR/cni" "$@"; }

# Each step's output goes to its log; on failure the log's tail goes to stderr.
LOG=/dev/null
run() {
  "$@" </dev/null >>"$LOG" 2>&1 || {
    log "failed: $* (log: $LOG)"
    tail -n 40 "$LOG" >&2
    exit 1
  }
}
# label IMAGE: the dev.fabric.inputs label of an image in podman's storage, if any.
label() { pm image inspect --format '{{index .Labels "dev.fabric.inputs"}}' "$1" 2>/dev/null || true; }

# As root, podman (`podman save` at least) keeps a blob-info cache in
# /var/lib/containers/cache, and podman 4.3 has no option to move it: when this run created
# /var/lib/containers, cleanup removes it again (rmdir: only if nothing else is in it). Only
# a cache: deleting it costs nothing.
VARLIB=/var/lib/containers
varlib_ours=""
[ -e "$VARLIB" ] || varlib_ours=1

WORK=$(mktemp -d "$OUT/tmp.XXXXXX")
cleanup() {
  # debootstrap mounts /proc and /sys inside its target: unmount before removing.
  awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m" || true; done
  rm -rf "$WORK"
  if [ -n "$varlib_ours" ] && [ -d "$VARLIB" ]; then
    rm -f "$VARLIB/cache/blob-info-cache-v1.boltdb"
    rmdir "$VARLIB/cache" "$VARLIB" 2>/dev/null || true
  fi
}
trap cleanup EXIT

# Builds reach PyPI and Debian as the host does: host network, and the host's CA bundle and
# pip configuration mounted read-only into RUN steps (never part of an image).
# --runtime-flag root=: RUN steps' runc state in the cache, not /run/runc.
build_opts=(--pull=never --network host --layers --runtime-flag "root=$PODMAN_DIR/runc")
ca=/etc/ssl/certs/ca-certificates.crt
[ -f "$ca" ] && build_opts+=(-v "$ca:$ca:ro")
[ -f /etc/pip.conf ] && build_opts+=(-v /etc/pip.conf:/etc/pip.conf:ro)
[ -d /etc/xdg/pip ] && build_opts+=(-v /etc/xdg/pip:/etc/xdg/pip:ro)

# save ROLE REF KEY: the image as an OCI archive in the cache. The role's 3 most recently
# used archives stay (mtime: written, or touched when used; see each role): a concurrent
# session may still be importing the one it was given before this build.
save() {
  local role=$1 ref=$2 key=$3 archive=$OUT/$1-${3:0:16}.oci.tar
  run pm save --format oci-archive -o "$WORK/$role.oci.tar" "$ref"
  mv "$WORK/$role.oci.tar" "$archive"
  find "$OUT" -maxdepth 1 -name "$role-*.oci.tar" -printf '%T@ %p\n' | sort -rn | tail -n +4 |
    cut -d' ' -f2- | while IFS= read -r f; do rm -f -- "$f"; done
  # Older builds of this role leave podman's storage too (shared layers stay).
  local id old
  id=$(pm image inspect --format '{{.Id}}' "$ref")
  for old in $(pm images -q --no-trunc --filter "label=dev.fabric.role=$role"); do
    [ "$old" = "$id" ] || [ "$old" = "sha256:$id" ] || pm rmi -f "$old" >/dev/null 2>&1 || true
  done
}

# ---- base: debootstrap minbase + python3, imported -------------------------------------
mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # deb822 stanzas: the URI of a `deb` stanza whose Suites name the release itself.
    uri=$(awk -v s="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
      { t = ""; u = ""; ok = 0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^Types:/) t = $i
          if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); u = a[2] }
          if ($i ~ /^Suites:/) { n = split($i, b, /[ \t]+/); for (j = 2; j <= n; j++) if (b[j] == s) ok = 1 }
        }
        if (ok && t ~ /(^|[ \t])deb([ \t]|$)/ && u != "") { print u; exit } }' "$f")
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  uri=$(awk -v s="$SUITE" '$1 == "deb" { for (i = 2; i < NF; i++) if ($(i + 1) == s && $i !~ /^\[/) { print $i; exit } }' \
    /etc/apt/sources.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR=$(mirror)
BASE_KEY=$(printf '%s\n' "$SUITE" "$MIRROR" "$BASE_PACKAGES" "$BASE_REF" |
  cat - "$CTX/base/finish-rootfs.sh" | sha)

base_ready=""
ensure_base() {
  [ -z "$base_ready" ] || return 0
  if [ "$(label "$BASE_REF")" != "$BASE_KEY" ]; then
    local rootfs=$OUT/base-${BASE_KEY:0:16}.rootfs.tar
    LOG=$OUT/logs/base.log
    : >"$LOG"
    local start=$SECONDS
    if [ ! -f "$rootfs" ]; then
      log "building the base image $BASE_REF (debootstrap $SUITE from $MIRROR, ~1-2 min)"
      local dir=$WORK/rootfs
      run debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$dir" "$MIRROR"
      run bash "$CTX/base/finish-rootfs.sh" "$dir"
      run tar --numeric-owner --xattrs -C "$dir" -cf "$WORK/rootfs.tar" .
      mv "$WORK/rootfs.tar" "$rootfs"
      find "$OUT" -maxdepth 1 -name 'base-*.rootfs.tar' ! -name "$(basename "$rootfs")" -delete
    fi
    run pm import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["python3"]' \
      --change "LABEL dev.fabric.inputs=$BASE_KEY" \
      --change "LABEL org.opencontainers.image.description=Debian $SUITE minbase with python3: a stand-in for python:3.11-slim-bookworm" \
      "$rootfs" "$BASE_REF"
    echo "get-images: base ready in $((SECONDS - start)) s" >>"$LOG"
  fi
  base_ready=1
}

# ---- pause -----------------------------------------------------------------------------
pause() {
  local key archive
  key=$(cat "$CTX/pause/pause.c" "$CTX/pause/Containerfile" <(gcc --version | head -n 1) <(echo "$PAUSE_REF") | sha)
  archive=$OUT/pause-${key:0:16}.oci.tar
  if [ ! -f "$archive" ]; then
    LOG=$OUT/logs/pause.log
    : >"$LOG"
    log "building $PAUSE_REF"
    local start=$SECONDS
    mkdir -p "$WORK/pause"
    cp "$CTX/pause/Containerfile" "$WORK/pause/"
    run gcc -static -Os -Wall -Wextra -o "$WORK/pause/pause" "$CTX/pause/pause.c"
    run strip "$WORK/pause/pause"
    run pm build "${build_opts[@]}" --label "dev.fabric.inputs=$key" --label dev.fabric.role=pause \
      -t "$PAUSE_REF" "$WORK/pause"
    save pause "$PAUSE_REF" "$key"
    echo "get-images: pause built in $((SECONDS - start)) s" >>"$LOG"
  fi
  touch "$archive" # used now: save() keeps the most recently used
  echo "pause $PAUSE_REF $archive"
}

# ---- operator: the project's Dockerfile, on the base --------------------------------------
operator() {
  local version ref key archive
  version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml" | head -n 1)
  [ -n "$version" ] || die "no version in pyproject.toml"
  ref=localhost/fabric-operator:$version
  # The files the Dockerfile uses (all .dockerignore lets in that the build reads); the
  # egg-info that a local `pip install -e` leaves is rebuilt by the build itself.
  key=$(
    cd "$REPO"
    {
      printf '%s\n' "$BASE_KEY" "$ref" "$version"
      find Dockerfile .dockerignore pyproject.toml README.md operator -type f \
        ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 |
        LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha
  )
  archive=$OUT/operator-${key:0:16}.oci.tar
  if [ ! -f "$archive" ]; then
    ensure_base
    LOG=$OUT/logs/operator.log
    : >"$LOG"
    log "building $ref (the project's Dockerfile)"
    local start=$SECONDS
    run pm build "${build_opts[@]}" --label "dev.fabric.inputs=$key" --label dev.fabric.role=operator \
      --build-arg "PYTHON_IMAGE=$BASE_REF" --build-arg "VERSION=$version" \
      -f "$REPO/Dockerfile" -t "$ref" "$REPO"
    save operator "$ref" "$key"
    echo "get-images: operator built in $((SECONDS - start)) s" >>"$LOG"
  fi
  touch "$archive" # used now: save() keeps the most recently used
  echo "operator $ref $archive"
}

# ---- engine: llama-server's CLI on llama-cpp-python, on the base --------------------------
engine() {
  local engine_py venv wheel_dir wheel version model key archive ref sp d base name
  # The wheel hack/get-tiny-engine.sh built (and cached) for the tests' engine.
  ls "$CACHE"/wheels/llama-cpp-python-*/llama_cpp_python-*.whl >/dev/null 2>&1 ||
    log "building the llama-cpp-python wheel first (hack/get-tiny-engine.sh, once, ~2-4 min)"
  engine_py=$(bash "$HERE/get-tiny-engine.sh") || die "hack/get-tiny-engine.sh failed"
  venv=$(dirname "$(dirname "$engine_py")")
  base=$(basename "$(dirname "$venv")") # tiny-engine-VERSION-KEY
  wheel_dir=$CACHE/wheels/llama-cpp-python-${base#tiny-engine-}
  [ -d "$wheel_dir" ] || wheel_dir=$(ls -dt "$CACHE"/wheels/llama-cpp-python-*/ 2>/dev/null | head -n 1)
  wheel=$(ls "${wheel_dir%/}"/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)
  [ -n "$wheel" ] || die "no llama-cpp-python wheel under $CACHE/wheels (hack/get-tiny-engine.sh)"
  version=$(basename "$wheel" | cut -d- -f2)

  mkdir -p "$WORK/engine/wheels"
  # The server's dependencies at the versions the tests run with (that venv's).
  for sp in "$venv"/lib/python3*/site-packages; do
    for d in "$sp"/*.dist-info; do
      [ -d "$d" ] || continue
      d=$(basename "$d" .dist-info)
      name=$(printf '%s' "${d%-*}" | tr 'A-Z_.' 'a-z--')
      case $name in pip | setuptools | wheel | llama-cpp-python) continue ;; esac
      printf '%s==%s\n' "$name" "${d##*-}"
    done
  done | LC_ALL=C sort >"$WORK/engine/wheels/constraints.txt"

  # The model: tests/support/tiny_model.py's tiny random GGUF (deterministic), made once.
  model=$OUT/tiny-$(sha <"$REPO/tests/support/tiny_model.py" | cut -c1-16).gguf
  if [ ! -f "$model" ]; then
    (cd "$REPO" && "$PY" -m tests.support.tiny_model "$WORK/tiny.gguf") >/dev/null ||
      die "cannot write the tiny model with $PY (make setup?)"
    mv "$WORK/tiny.gguf" "$model"
  fi

  key=$(
    cd "$CTX/engine"
    { printf '%s\n' "$BASE_KEY"; sha256sum Containerfile llama_server.py sitecustomize.py \
        "$wheel" "$model" "$WORK/engine/wheels/constraints.txt" | cut -c1-64; } | sha
  )
  ref=localhost/fabric-llama-server:$version-${key:0:12}
  archive=$OUT/engine-${key:0:16}.oci.tar
  if [ ! -f "$archive" ]; then
    ensure_base
    LOG=$OUT/logs/engine.log
    : >"$LOG"
    log "building $ref (llama-cpp-python $version on the base; PyPI for its dependencies)"
    local start=$SECONDS
    cp "$CTX/engine/Containerfile" "$CTX/engine/sitecustomize.py" "$WORK/engine/"
    install -m 0755 "$CTX/engine/llama_server.py" "$WORK/engine/llama-server"
    cp "$model" "$WORK/engine/tiny.gguf"
    cp "$wheel" "$WORK/engine/wheels/"
    run pm build "${build_opts[@]}" --label "dev.fabric.inputs=$key" --label dev.fabric.role=engine \
      --build-arg "BASE_IMAGE=$BASE_REF" --build-arg "LLAMA_CPP_PYTHON_VERSION=$version" \
      -t "$ref" "$WORK/engine"
    save engine "$ref" "$key"
    echo "get-images: engine built in $((SECONDS - start)) s" >>"$LOG"
  fi
  touch "$archive" # used now: save() keeps the most recently used
  echo "engine $ref $archive"
}

# ---- transformers: `transformers serve` with CPU torch, on the base ---------------------
transformers() {
  local py venv sp d name versions tf_version torch_version model key ref archive ctx
  # The tests' venv (built and cached once): its versions are the image's.
  py=$(bash "$HERE/get-transformers-serve.sh") || die "hack/get-transformers-serve.sh failed"
  venv=$(dirname "$(dirname "$py")")
  ctx=$WORK/transformers
  mkdir -p "$ctx/wheels"
  for sp in "$venv"/lib/python3*/site-packages; do
    for d in "$sp"/*.dist-info; do
      [ -d "$d" ] || continue
      d=$(basename "$d" .dist-info)
      name=$(printf '%s' "${d%-*}" | tr 'A-Z_.' 'a-z--')
      case $name in pip | wheel) continue ;; esac
      printf '%s==%s\n' "$name" "${d##*-}"
    done
  done | LC_ALL=C sort >"$ctx/wheels/constraints.txt"
  versions=$ctx/wheels/constraints.txt
  tf_version=$(sed -n 's/^transformers==//p' "$versions")
  torch_version=$(sed -n 's/^torch==//p' "$versions")
  [ -n "$tf_version" ] && [ -n "$torch_version" ] || die "no transformers or torch in $venv"
  case $torch_version in *+cpu) ;; *) die "torch $torch_version in $venv is not a CPU build" ;; esac

  # The model: tests/support/tiny_hf_model.py's directory (deterministic), made each run
  # (0.2 s) and keyed by its bytes.
  (cd "$REPO" && "$PY" -m tests.support.tiny_hf_model "$ctx/tiny") >/dev/null ||
    die "cannot write the tiny Hugging Face model with $PY (make setup?)"
  key=$(
    cd "$ctx"
    { printf '%s\n' "$BASE_KEY"; sha256sum "$CTX/transformers/Containerfile" wheels/constraints.txt \
        tiny/* | cut -c1-64; } | sha
  )
  ref=localhost/fabric-transformers-serve:$tf_version-${key:0:12}
  archive=$OUT/transformers-${key:0:16}.oci.tar
  if [ ! -f "$archive" ]; then
    ensure_base
    LOG=$OUT/logs/transformers.log
    : >"$LOG"
    log "building $ref (transformers $tf_version, torch $torch_version; ~2 min, ~1 GB)"
    local start=$SECONDS
    # torch's CPU wheel, from where the host's pip finds it (find-links): never PyPI's
    # CUDA build. `pip download` copies the file it resolves into the context.
    run "$py" -m pip download -q --no-deps --only-binary=:all: "torch==$torch_version" -d "$ctx/wheels"
    cp "$CTX/transformers/Containerfile" "$ctx/"
    run pm build "${build_opts[@]}" --label "dev.fabric.inputs=$key" --label dev.fabric.role=transformers \
      --build-arg "BASE_IMAGE=$BASE_REF" --build-arg "TRANSFORMERS_VERSION=$tf_version" \
      --build-arg "TORCH_VERSION=$torch_version" -t "$ref" "$ctx"
    save transformers "$ref" "$key"
    echo "get-images: transformers built in $((SECONDS - start)) s" >>"$LOG"
  fi
  touch "$archive" # used now: save() keeps the most recently used
  echo "transformers $ref $archive"
}

for r in "${roles[@]}"; do "$r"; done
