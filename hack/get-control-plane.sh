#!/usr/bin/env bash
# Make a real Kubernetes control plane's binaries available for local runs and tests.
#
# Prints the directory holding kube-apiserver, kube-controller-manager, kube-scheduler
# and etcd. Order of preference:
#   1. $KUBEBUILDER_ASSETS (the setup-envtest convention), when it holds the binaries;
#   2. the cache ($FABRIC_CACHE_DIR, default ~/.cache/fabric-operator/k8s-v1.20.2);
#   3. a build from Debian bookworm's own `kubernetes` source package (offline: the tree
#      vendors its Go dependencies), cached for next time. ~7-10 minutes on 2 cores.
# Progress goes to stderr; only the directory goes to stdout.
set -euo pipefail

log() { printf 'get-control-plane: %s\n' "$*" >&2; }
have_all() { local d=$1; for b in kube-apiserver kube-controller-manager kube-scheduler; do [ -x "$d/$b" ] || return 1; done; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && have_all "$KUBEBUILDER_ASSETS" && [ -x "$KUBEBUILDER_ASSETS/etcd" ]; then
  echo "$KUBEBUILDER_ASSETS"; exit 0
fi

CACHE=${FABRIC_CACHE_DIR:-$HOME/.cache/fabric-operator}/k8s-v1.20.2
BIN=$CACHE/bin
mkdir -p "$BIN"

apt_updated=""
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq >&2; apt_updated=1; fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# etcd comes from Debian as a binary package; openssl makes the throw-away certificates.
apt_install etcd-server openssl
ln -sf "$(command -v etcd || echo /usr/bin/etcd)" "$BIN/etcd"

if have_all "$BIN"; then echo "$BIN"; exit 0; fi

log "building kube-apiserver, kube-controller-manager, kube-scheduler from Debian's source (once, ~10 min)"
apt_install golang-1.19-go golang-github-modern-go-reflect2-dev rsync make dpkg-dev
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fabric-k8s-build.XXXXXX")
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT

# Private deb-src entries: the system's apt configuration stays untouched.
mkdir -p "$WORK/apt/sources.d" "$WORK/apt/lists/partial"
for f in /etc/apt/sources.list.d/*.sources; do
  sed 's/^Types: deb$/Types: deb-src/' "$f" > "$WORK/apt/sources.d/$(basename "$f")"
done
APT_OPTS=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$WORK/apt/sources.d"
          -o "Dir::State::Lists=$WORK/apt/lists" -o "APT::Sandbox::User=root")
apt-get "${APT_OPTS[@]}" update -qq >&2
(cd "$WORK" && apt-get "${APT_OPTS[@]}" source --download-only -qq kubernetes >&2)
dsc=$(ls "$WORK"/kubernetes_*.dsc | head -n 1)
dpkg-source -x --no-check "$dsc" "$WORK/src" >&2

# The vendored reflect2 v1.0.1 segfaults under Go >= 1.18: use Debian's 1.0.2.
r2=$WORK/src/vendor/github.com/modern-go/reflect2
rm -f "$r2"/*.go "$r2"/*.s
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$r2"/
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$r2"/ 2>/dev/null || true

export GOPATH=$WORK/gopath GOCACHE=$WORK/gocache GO111MODULE=off CGO_ENABLED=0
export PATH=/usr/lib/go-1.19/bin:$PATH
export KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
mkdir -p "$GOPATH/src/k8s.io"
ln -s "$WORK/src" "$GOPATH/src/k8s.io/kubernetes"
(cd "$GOPATH/src/k8s.io/kubernetes" && \
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >&2)
out=$WORK/src/_output/local/bin/linux/$(go env GOARCH)
for b in kube-apiserver kube-controller-manager kube-scheduler; do install -m 0755 "$out/$b" "$BIN/$b"; done
log "cached in $BIN"
echo "$BIN"
