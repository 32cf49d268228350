#!/usr/bin/env bash
# Make the parts of a real Kubernetes node available: kubelet and kube-proxy v1.20.2, and
# what a node needs at run time (see shared/notes/real-node.md for how they fit together).
#
# Prints the directory holding kubelet and kube-proxy. Order of preference:
#   1. $FABRIC_NODE_BIN, when it holds both;
#   2. the cache ($FABRIC_CACHE_DIR, default ~/.cache/fabric-operator/k8s-v1.20.2/bin,
#      shared with hack/get-control-plane.sh, which builds these two along with its own);
#   3. a build of only these two from Debian's source (hack/lib/k8s-source.sh), cached.
# Progress goes to stderr; only the directory goes to stdout.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/k8s-source.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/k8s-source.sh"

have_all() { [ -x "$1/kubelet" ] && [ -x "$1/kube-proxy" ]; }

# Run-time parts, all from Debian (no registry is reachable): containerd + runc as the CRI
# runtime; the CNI plugins (in /usr/lib/cni); iptables, iproute2, conntrack for kube-proxy
# and pod networking; util-linux for nsenter into the node's network namespace; podman and
# debootstrap to build images without a registry; gcc + libc6-dev for the static pause
# binary. No uidmap: podman wants it only rootless, and the node runs as root.
# PKG:CMD skips a package whose command is already there (k8s_apt_install): a Docker host's
# containerd.io provides containerd and runc. The CNI plugins must be in /usr/lib/cni, where
# each node's containerd config points (not /opt/cni/bin).
k8s_apt_install containerd:containerd runc:runc containernetworking-plugins:/usr/lib/cni/bridge \
  iptables:iptables iproute2:ip util-linux:nsenter conntrack:conntrack podman:podman \
  debootstrap:debootstrap gcc:gcc libc6-dev

if [ -n "${FABRIC_NODE_BIN:-}" ]; then
  if have_all "$FABRIC_NODE_BIN"; then echo "$FABRIC_NODE_BIN"; exit 0; fi
  k8s_log "FABRIC_NODE_BIN=$FABRIC_NODE_BIN lacks kubelet or kube-proxy: using the cache"
fi

CACHE=${FABRIC_CACHE_DIR:-$HOME/.cache/fabric-operator}/k8s-v1.20.2
BIN=$CACHE/bin
if have_all "$BIN"; then echo "$BIN"; exit 0; fi

mkdir -p "$BIN"
# One build at a time (parallel sessions, or get-control-plane.sh, share the cache).
exec 9>"$CACHE/.lock"
flock 9
if have_all "$BIN"; then echo "$BIN"; exit 0; fi

k8s_log "building kubelet, kube-proxy from Debian's source (once, ~6-10 min)"
start=$(date +%s)
k8s_source_build "$BIN" kubelet kube-proxy
k8s_log "built in $(( $(date +%s) - start ))s, cached in $BIN"
echo "$BIN"
