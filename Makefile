# fabric-operator: the two commands of the README, and the checks behind them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test setup lint crd clean

# Set everything up and run the operator; without KUBECONFIG, on a local cluster with a
# real node (root: namespaces, a veth), ending with the example CPU backend answering
# through the gateway (hack/dev.py). Images: pause and engine only (the operator runs here
# as a local process, not from its image).
run: setup
	@bash hack/get-images.sh pause engine >/dev/null
	$(BIN)/python hack/dev.py

# Set everything up and run every check: lint, types, unit, chart, integration, e2e tests.
test: setup
	$(BIN)/ruff check operator tests bench hack
	$(BIN)/ruff format --check operator tests bench hack
	$(BIN)/mypy
	@bash hack/get-images.sh >/dev/null
	$(BIN)/pytest

# The local cluster: control plane, real node parts (each cached after its first build:
# about 15 minutes on a fresh 2-core machine with the images, seconds after). The images
# are run's and test's own step: each builds only those it uses (hack/get-images.sh).
setup: $(VENV)/.installed
	@FABRIC_K8S_BIN= bash hack/get-control-plane.sh >/dev/null
	@bash hack/get-node.sh >/dev/null
	@bash hack/get-helm.sh >/dev/null
	@bash hack/get-redis.sh >/dev/null

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Regenerate the committed CRD (and the chart's copy) from the API models.
crd: setup
	$(BIN)/fabric-operator crd > crds/llm.fabric.dev_llmbackends.yaml
	cp crds/llm.fabric.dev_llmbackends.yaml charts/fabric-operator/files/crd.yaml

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
