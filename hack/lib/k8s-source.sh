# shellcheck shell=bash
# Sourced by hack/get-control-plane.sh and hack/get-node.sh: Kubernetes v1.20.2 built from
# Debian bookworm's own `kubernetes` source package. Offline once apt has the source: the
# tree vendors its Go dependencies. Progress goes to stderr.
#
# k8s_apt_install is shared too, so that one run calls `apt-get update` at most
# once, whether it is installing run-time packages or build dependencies.

k8s_log() { printf '%s: %s\n' "$(basename "$0" .sh)" "$*" >&2; }

k8s_apt_updated=""
# k8s_apt_install SPEC...: installs only what is missing. SPEC is PKG, or PKG:CMD to skip PKG
# when CMD (a command on PATH, or an absolute path) is already there: on a Docker host,
# containerd.io *provides* containerd and runc, so dpkg says "containerd" is not installed
# while the commands are there, and installing Debian's packages would replace containerd.io
# (and docker-ce with it). No arch-qualified names (pkg:amd64) here.
#
# Services: on a systemd host, maintainer scripts enable and start their package's services
# (Debian's containerd: containerd.service; etcd-server: etcd.service; podman: podman.socket
# and more). The install runs with SYSTEMD_OFFLINE=1, which makes systemctl (bookworm's
# systemd 252 checked) skip start/restart/daemon-reload as in a chroot: nothing is started, and no
# host-wide /usr/sbin/policy-rc.d is needed. The units stay *enabled* (deb-systemd-helper
# writes the symlinks itself), so they start at the next boot; the local cluster never uses
# them (each node runs its own containerd, the control plane its own etcd, on their own
# sockets and ports).
k8s_apt_install() {
  local sudo="" spec p c missing=()
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  for spec in "$@"; do
    p=${spec%%:*} c=""
    [ "$p" = "$spec" ] || c=${spec#*:}
    case $c in
      "") ;;
      /*) [ -e "$c" ] && continue ;;
      # sbin too: runc and iptables live there, outside a non-root user's PATH.
      *) PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin command -v "$c" >/dev/null && continue ;;
    esac
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  # Wait for dpkg's lock instead of failing: parallel sessions install packages too.
  local wait=(-o DPkg::Lock::Timeout=600)
  if [ -z "$k8s_apt_updated" ]; then $sudo apt-get "${wait[@]}" update -qq >&2; k8s_apt_updated=1; fi
  k8s_log "apt-get install ${missing[*]}"
  # --no-remove: apt fails instead of removing a package (containerd.io, docker-ce, ...) to
  # make room for one of these. env: sudo would drop the variables from the environment.
  $sudo env DEBIAN_FRONTEND=noninteractive SYSTEMD_OFFLINE=1 \
    apt-get "${wait[@]}" install -y -qq --no-remove --no-install-recommends "${missing[@]}" >&2
}

# k8s_source_build BIN_DIR NAME...: builds cmd/NAME for each NAME in one source unpack and
# installs the binaries into BIN_DIR. Callers hold the cache lock.
k8s_source_build() {
  local bin=$1; shift
  # gcc and libc6-dev: the kubelet is a cgo build (below).
  k8s_apt_install golang-1.19-go golang-github-modern-go-reflect2-dev rsync make dpkg-dev gcc libc6-dev
  # A subshell: its EXIT trap removes the ~1.5 GB work tree even on failure, without
  # replacing the caller's traps, and the Go environment stays in here.
  (
    set -euo pipefail
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/fabric-k8s-build.XXXXXX")
    trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT

    # Private deb-src entries: the system's apt configuration stays untouched.
    mkdir -p "$WORK/apt/sources.d" "$WORK/apt/lists/partial"
    for f in /etc/apt/sources.list.d/*.sources; do
      sed 's/^Types: deb$/Types: deb-src/' "$f" > "$WORK/apt/sources.d/$(basename "$f")"
    done
    apt_opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$WORK/apt/sources.d"
              -o "Dir::State::Lists=$WORK/apt/lists" -o "APT::Sandbox::User=root")
    apt-get "${apt_opts[@]}" update -qq >&2
    (cd "$WORK" && apt-get "${apt_opts[@]}" source --download-only -qq kubernetes >&2)
    dsc=("$WORK"/kubernetes_*.dsc)
    dpkg-source -x --no-check "${dsc[0]}" "$WORK/src" >&2

    # The vendored reflect2 v1.0.1 segfaults under Go >= 1.18: use Debian's 1.0.2.
    r2=$WORK/src/vendor/github.com/modern-go/reflect2
    rm -f "$r2"/*.go "$r2"/*.s
    cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$r2"/
    cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$r2"/ 2>/dev/null || true

    # CGO_ENABLED=1: upstream's hack/lib/golang.sh still builds the binaries on its static
    # list (kube-apiserver, -controller-manager, -scheduler, kube-proxy) with CGO_ENABLED=0,
    # and the rest (the kubelet) with this value, as upstream's releases do: a kubelet
    # linked against glibc, like the one seen running pods (shared/notes/real-node.md).
    export GOPATH=$WORK/gopath GOCACHE=$WORK/gocache GO111MODULE=off CGO_ENABLED=1
    export PATH=/usr/lib/go-1.19/bin:$PATH
    export KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
    mkdir -p "$GOPATH/src/k8s.io"
    ln -s "$WORK/src" "$GOPATH/src/k8s.io/kubernetes"
    what=$(printf 'cmd/%s ' "$@")
    (cd "$GOPATH/src/k8s.io/kubernetes" && make WHAT="${what% }" >&2)

    out=$WORK/src/_output/local/bin/linux/$(go env GOARCH)
    mkdir -p "$bin"
    # Copy then rename: a reader that checks the cache without the lock never sees half a binary.
    for b in "$@"; do
      install -m 0755 "$out/$b" "$bin/.tmp-$b"
      mv -f "$bin/.tmp-$b" "$bin/$b"
    done
  )
}
