#!/usr/bin/env bash
# Make a real Kubernetes control plane's binaries available for local runs and tests.
#
# Prints the directory holding kube-apiserver, kube-controller-manager, kube-scheduler
# and etcd. Order of preference:
#   1. $KUBEBUILDER_ASSETS (the setup-envtest convention), when it holds the binaries;
#   2. the cache ($FABRIC_CACHE_DIR, default ~/.cache/fabric-operator/k8s-v1.20.2);
#   3. a build from Debian bookworm's own `kubernetes` source package (hack/lib/k8s-source.sh),
#      cached for next time. ~7-10 minutes on 2 cores.
# Progress goes to stderr; only the directory goes to stdout.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/k8s-source.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/k8s-source.sh"

have_all() { local d=$1; for b in kube-apiserver kube-controller-manager kube-scheduler; do [ -x "$d/$b" ] || return 1; done; }

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && have_all "$KUBEBUILDER_ASSETS" && [ -x "$KUBEBUILDER_ASSETS/etcd" ]; then
  echo "$KUBEBUILDER_ASSETS"; exit 0
fi

CACHE=${FABRIC_CACHE_DIR:-$HOME/.cache/fabric-operator}/k8s-v1.20.2
BIN=$CACHE/bin
mkdir -p "$BIN"

# etcd comes from Debian as a binary package; openssl makes the throw-away certificates.
k8s_apt_install etcd-server openssl
ln -sf "$(command -v etcd || echo /usr/bin/etcd)" "$BIN/etcd"

if have_all "$BIN"; then echo "$BIN"; exit 0; fi

# One build at a time: hack/get-node.sh builds into the same cache under the same lock.
exec 9>"$CACHE/.lock"
flock 9
if have_all "$BIN"; then echo "$BIN"; exit 0; fi

# The node's binaries too: one source download, code generation and compile of the shared
# Go packages serve all five, so a fresh machine pays them once.
k8s_log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy from Debian's source (once, ~10 min)"
start=$(date +%s)
k8s_source_build "$BIN" kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy
k8s_log "built in $(( $(date +%s) - start ))s, cached in $BIN"
echo "$BIN"
