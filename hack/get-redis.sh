#!/usr/bin/env bash
# Debian's redis-server, for the gateway tests and bench/gateway that share the keys'
# limits between gateway processes through a real Redis. The tests start their own
# servers (127.0.0.1, a free port, nothing saved); the package's own service is never
# used, and is not started here (SYSTEMD_OFFLINE=1: see hack/lib/k8s-source.sh).
# Skipped when redis-server is already on PATH. Prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=hack/lib/k8s-source.sh
source hack/lib/k8s-source.sh
k8s_apt_install redis-server:redis-server
command -v redis-server
