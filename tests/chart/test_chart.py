"""The Helm chart: lints, renders valid objects for current Kubernetes, least privilege."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fabric_operator.api.crd import crd_manifest
from fabric_operator.config import OperatorConfig
from fabric_operator.gateway import server
from fabric_operator.remotehosts import DEFAULT_HOSTS, RemoteHosts
from tests.chart.conftest import CHART
from tests.conftest import REPO

K8S_VERSION = "1.33"  # schemas of a current release, not only the 1.20 test server
CUSTOM = [
    "--set",
    "watch.namespaces={team-a,team-b}",
    "--set",
    "crds.install=false",
    "--set",
    "image.tag=9.9.9",
    "--set",
    "imagePullSecrets[0].name=regcred",
    "--set",
    "nodeSelector.pool=system",
    "--set",
    "priorityClassName=ops",
    "--set",
    "extraEnv[0].name=X",
    "--set",
    "extraEnv[0].value=y",
    "--set",
    "tolerations[0].operator=Exists",
    "--set",
    "operator.workers=8",
]


def template(helm: Path, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(helm), "template", "rel", str(CHART), "--namespace", "ops", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def refused(helm: Path, *args: str) -> str:
    proc = subprocess.run(
        [str(helm), "template", "rel", str(CHART), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0, "values should have been refused"
    return proc.stderr


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_lint_strict(helm: Path) -> None:
    for args in ([], CUSTOM):
        proc = subprocess.run(
            [str(helm), "lint", "--strict", str(CHART), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


GATEWAY = ["--set", "gateway.enabled=true"]


@pytest.mark.parametrize(
    "args",
    [[], CUSTOM, GATEWAY, [*GATEWAY, "--set", "watch.namespaces={a,b}"]],
    ids=["default", "custom", "gateway", "gateway-namespaced"],
)
def test_every_object_is_valid_kubernetes(helm: Path, args: list[str]) -> None:
    docs = template(helm, *args)
    assert docs
    label_value = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        # The schemas do not check label syntax; the API server does.
        for value in (doc["metadata"].get("labels") or {}).values():
            assert len(value) <= 63 and label_value.fullmatch(value), (doc["kind"], value)


def test_crd_is_the_generated_one_and_kept(helm: Path) -> None:
    assert (CHART / "files" / "crd.yaml").read_text() == (
        REPO / "crds" / "llm.fabric.dev_llmbackends.yaml"
    ).read_text(), "run `make crd`"
    [crd] = by_kind(template(helm, "--kube-version=1.30.0"), "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["spec"] == crd_manifest()["spec"]
    assert not by_kind(template(helm, "--set", "crds.install=false"), "CustomResourceDefinition")


@pytest.mark.parametrize(
    ("kube", "cel"),
    [
        ("1.20.2", False),
        ("1.24.9", False),
        ("v1.24.17-eks-a5565ad", False),
        ("1.25.0", True),
        ("v1.25.0-gke.100", True),
    ],
)
def test_the_cel_rules_only_go_to_servers_that_check_them(helm: Path, kube: str, cel: bool) -> None:
    """Before 1.23 the field is unknown (kubectl and Helm refuse the CRD), before 1.25 off."""
    [crd] = by_kind(template(helm, f"--kube-version={kube}"), "CustomResourceDefinition")
    assert crd["spec"] == crd_manifest(cel=cel)["spec"]
    assert ("x-kubernetes-validations" in json.dumps(crd)) is cel


def test_chart_versions_follow_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert version is not None
    assert chart["version"] == chart["appVersion"] == version.group(1)


EXPECTED_RULES = {
    ("llm.fabric.dev", "llmbackends"): {"get", "list", "watch"},
    ("llm.fabric.dev", "llmbackends/status"): {"patch"},
    ("llm.fabric.dev", "llmbackends/scale"): {"patch"},  # the autoscaler's replicas
    ("llm.fabric.dev", "llmbackends/finalizers"): {"update"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
    ("networking.k8s.io", "networkpolicies"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "create", "patch", "delete"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"list", "watch"},
    ("", "secrets"): {"get"},
    ("", "events"): {"create"},
}


def rules(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_rbac_cluster_scope_is_exactly_what_the_operator_uses(helm: Path) -> None:
    docs = template(helm)
    [role] = by_kind(docs, "ClusterRole")
    assert rules(role) == EXPECTED_RULES
    assert "*" not in json.dumps(role["rules"])
    [binding] = by_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-fabric-operator", "namespace": "ops"}
    ]
    assert not by_kind(docs, "Role")


def test_rbac_namespace_scope_gives_one_role_per_namespace(helm: Path) -> None:
    docs = template(helm, *CUSTOM)
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles = [r for r in by_kind(docs, "Role") if not r["metadata"]["name"].endswith("-pods")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(rules(r) == EXPECTED_RULES for r in roles)
    assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")) == [
        "ops",  # the gateway pods' (below)
        "team-a",
        "team-b",
    ]
    [deployment] = by_kind(docs, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a,team-b" in args and "--workers=8" in args


def test_the_autoscaler_may_list_gateway_pods_in_the_release_namespace_only(helm: Path) -> None:
    """Namespaced, the operator's Roles are in the served namespaces; the gateway's pods
    (whose load the autoscaler reads) are in the release's: a Role there for pods alone."""
    docs = template(helm, *CUSTOM)
    [role] = [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-gateway-pods")]
    assert role["metadata"]["namespace"] == "ops"
    assert rules(role) == {("", "pods"): {"list", "watch"}}
    [binding] = [
        b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"].endswith("-gateway-pods")
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["namespace"] == "ops"
    # Serving the release namespace too, or cluster-wide, its Role already has pods.
    served = template(helm, "--set", "watch.namespaces={team-a,ops}")
    assert not [r for r in by_kind(served, "Role") if r["metadata"]["name"].endswith("-pods")]
    assert not [
        r for r in by_kind(template(helm), "Role") if r["metadata"]["name"].endswith("-pods")
    ]


def test_operator_pod_is_hardened(helm: Path) -> None:
    [deployment] = by_kind(template(helm), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["limits"]["memory"] == "256Mi"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["image"] == "ghcr.io/fabric-dev/fabric-operator:0.1.0"
    assert container["args"][0] == "run"


def test_values_overrides_reach_the_pod(helm: Path) -> None:
    [deployment] = by_kind(template(helm, *CUSTOM), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"].endswith(":9.9.9")
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["priorityClassName"] == "ops"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert {"name": "X", "value": "y"} in pod["containers"][0]["env"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "operator.workrs=3"], "Additional property workrs is not allowed"),
        (["--set", "replicaCount=two"], "replicaCount: Invalid type. Expected: integer"),
        (["--set", "replicaCount=2"], "replicaCount > 1 needs leaderElection.enabled=true"),
        (
            ["--set", "gateway.service.type=Public"],
            "gateway.service.type: gateway.service.type must",
        ),
        (["--set", "watch.namespaces={Team_A}"], "watch.namespaces.0: Does not match pattern"),
        (["--set", "operator.logLevel=LOUD"], "operator.logLevel: operator.logLevel must be"),
        (
            ["--set", "remote.allowedHosts={https://api.openai.com/v1}"],
            "remote.allowedHosts.0: Does not match pattern",
        ),
        (
            ["--set", "remote.allowedHttpHosts={vllm.svc:8000/v1}"],
            "remote.allowedHttpHosts.0: Does not match pattern",
        ),
        (["--set", "image.pullPolicy=Sometimes"], "image.pullPolicy: image.pullPolicy must be"),
        (
            ["--set", "metrics.serviceMonitor.interval=soon"],
            "metrics.serviceMonitor.interval: Does not match pattern",
        ),
    ],
)
def test_values_schema_refuses_mistakes(helm: Path, args: list[str], words: str) -> None:
    assert words in refused(helm, *args)


def test_every_value_is_documented() -> None:
    text = (CHART / "values.yaml").read_text()
    documented = set(re.findall(r"^\s*## @param (\S+)", text, re.M))

    def leaves(node: Any, prefix: str = "") -> set[str]:
        if isinstance(node, dict) and node and prefix not in {"resources", "gateway.resources"}:
            return {
                p
                for k, v in node.items()
                for p in leaves(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
            }
        return {prefix}

    assert leaves(yaml.safe_load(text)) <= documented
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(yaml.safe_load(text)) == set(schema["properties"])


def test_gpu_values_become_a_config_the_operator_reads(helm: Path) -> None:
    docs = template(
        helm,
        "--set",
        "gpu.labelScheme=gke",
        "--set",
        "gpu.tolerations=false",
        "--set",
        "gpu.accelerators.RTX-6000.nodeSelector.gpu=rtx6000",
    )
    [configmap] = by_kind(docs, "ConfigMap")
    config = OperatorConfig.model_validate(yaml.safe_load(configmap["data"]["config.yaml"]))
    assert config.label_scheme == "gke" and config.gpu_tolerations is False
    assert config.catalogue()["RTX-6000"].node_selector == {"gpu": "rtx6000"}
    assert config.catalogue()["L4"].node_selector == {
        "cloud.google.com/gke-accelerator": "nvidia-l4"
    }
    [deployment] = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]
    assert "--config=/etc/fabric-operator/config.yaml" in pod["spec"]["containers"][0]["args"]
    assert pod["metadata"]["annotations"]["checksum/config"]
    [configmap] = by_kind(template(helm), "ConfigMap")
    default = yaml.safe_load(configmap["data"]["config.yaml"])
    # The gateway runs in the release namespace: the only one engines admit it from.
    assert default["gatewayNamespace"] == configmap["metadata"]["namespace"]
    # The chart writes the default remote hosts out (one list for operator and gateway).
    assert OperatorConfig.model_validate(default).remote() == OperatorConfig().remote()
    same = {"remote_hosts", "remote_http_hosts", "gateway_namespace"}
    assert OperatorConfig.model_validate(default).model_dump(exclude=same) == (
        OperatorConfig().model_dump(exclude=same)
    )


def test_operator_upgrades_never_run_two_operators(helm: Path) -> None:
    [deployment] = by_kind(template(helm), "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not [r for r in by_kind(template(helm), "Role") if "leader" in r["metadata"]["name"]]


def test_leader_election_allows_replicas_with_a_lease_role(helm: Path) -> None:
    docs = template(helm, "--set", "leaderElection.enabled=true", "--set", "replicaCount=3")
    [deployment] = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--leader-elect" in args and "--leader-election-namespace=ops" in args
    [role] = [r for r in by_kind(docs, "Role") if "leader" in r["metadata"]["name"]]
    assert role["metadata"]["namespace"] == "ops"
    assert rules(role) == {("coordination.k8s.io", "leases"): {"get", "create", "update"}}


def test_gateway_is_off_by_default_and_complete_when_on(helm: Path) -> None:
    assert all("gateway" not in d["metadata"]["name"] for d in template(helm))
    docs = template(helm, *GATEWAY)
    operator, gateway = sorted(
        by_kind(docs, "Deployment"), key=lambda d: "gateway" in d["metadata"]["name"]
    )
    assert gateway["metadata"]["name"] == "rel-fabric-operator-gateway"
    # Neither Deployment's selector picks the other's pods.
    op_sel, gw_sel = (d["spec"]["selector"]["matchLabels"] for d in (operator, gateway))
    gw_labels = gateway["spec"]["template"]["metadata"]["labels"]
    op_labels = operator["spec"]["template"]["metadata"]["labels"]
    assert not op_sel.items() <= gw_labels.items() and not gw_sel.items() <= op_labels.items()
    pod = gateway["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = pod["containers"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["args"][0] == "gateway"
    assert "--key-selector=llm.fabric.dev/gateway-key=true" in container["args"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    services = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
    assert services["rel-fabric-operator-gateway"]["spec"]["selector"] == gw_sel
    assert "--namespace-of-gateway=ops" in container["args"]  # where the admin's keys are
    [role] = [r for r in by_kind(docs, "ClusterRole") if "gateway" in r["metadata"]["name"]]
    # Cluster-wide, it lists Secrets everywhere: key Secrets are found by label, and RBAC
    # cannot restrict a list to a label (README "Tenancy and security").
    assert rules(role) == GATEWAY_RULES


GATEWAY_RULES = {
    ("llm.fabric.dev", "llmbackends"): {"list", "watch"},
    ("", "endpoints"): {"list", "watch"},
    ("", "secrets"): {"get", "list", "watch"},
}


def gateway_roles(docs: list[dict[str, Any]]) -> dict[str, dict[tuple[str, str], set[str]]]:
    return {
        r["metadata"]["namespace"]: rules(r)
        for r in by_kind(docs, "Role")
        if r["metadata"]["name"] == "rel-fabric-operator-gateway"
    }


def test_gateway_rbac_is_per_namespace_when_namespaces_are_set(helm: Path) -> None:
    """Served namespaces: backends, Endpoints and Secrets; its own namespace, unserved:
    the admin's key Secrets (list/watch) and nothing else; no other namespace at all."""
    docs = template(helm, *GATEWAY, "--set", "watch.namespaces={team-a,team-b}")
    assert not [r for r in by_kind(docs, "ClusterRole") if "gateway" in r["metadata"]["name"]]
    assert not [
        b for b in by_kind(docs, "ClusterRoleBinding") if "gateway" in b["metadata"]["name"]
    ]
    assert gateway_roles(docs) == {
        "team-a": GATEWAY_RULES,
        "team-b": GATEWAY_RULES,
        "ops": {("", "secrets"): {"list", "watch"}},
    }
    bindings = [
        b
        for b in by_kind(docs, "RoleBinding")
        if b["metadata"]["name"] == "rel-fabric-operator-gateway"
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ops", "team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["name"] == "rel-fabric-operator-gateway"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "rel-fabric-operator-gateway", "namespace": "ops"}
        ]
    # Serving its own namespace too: one Role there, the whole one.
    served = template(helm, *GATEWAY, "--set", "watch.namespaces={team-a,ops}")
    assert gateway_roles(served) == {"team-a": GATEWAY_RULES, "ops": GATEWAY_RULES}


def gateway_remote_hosts(docs: list[dict[str, Any]]) -> RemoteHosts:
    """The allow-list as the gateway parses its rendered args."""
    [deployment] = [d for d in by_kind(docs, "Deployment") if "gateway" in d["metadata"]["name"]]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "gateway"
    parser = argparse.ArgumentParser()
    server.add_flags(parser)
    parsed = parser.parse_args(args[1:])
    return RemoteHosts.of(parsed.remote_hosts, parsed.remote_http_hosts)


def operator_remote_hosts(docs: list[dict[str, Any]]) -> RemoteHosts:
    [configmap] = by_kind(docs, "ConfigMap")
    data = yaml.safe_load(configmap["data"]["config.yaml"])
    return OperatorConfig.model_validate(data).remote()


def test_remote_hosts_reach_the_operator_and_the_gateway_alike(helm: Path, tmp_path: Path) -> None:
    default = template(helm, *GATEWAY)
    assert gateway_remote_hosts(default) == operator_remote_hosts(default) == RemoteHosts()
    assert RemoteHosts().https == DEFAULT_HOSTS and RemoteHosts().http == ()
    custom = template(
        helm,
        *GATEWAY,
        "--set",
        "remote.allowedHosts={llm.example.com,*.models.example.org}",
        "--set",
        "remote.allowedHttpHosts={vllm.ml.svc.cluster.local}",
    )
    wanted = RemoteHosts(
        ("llm.example.com", "*.models.example.org"), ("vllm.ml.svc.cluster.local",)
    )
    assert gateway_remote_hosts(custom) == operator_remote_hosts(custom) == wanted
    assert wanted.refusal("https://api.openai.com/v1") is not None  # the list replaces
    # None at all: an empty list (from a values file; `--set x={}` is [""], refused).
    values = tmp_path / "none.yaml"
    values.write_text("remote: {allowedHosts: []}\n")
    nothing = template(helm, *GATEWAY, "-f", str(values))
    assert gateway_remote_hosts(nothing) == operator_remote_hosts(nothing) == RemoteHosts((), ())
    # A value removed with --set ...=null is "none" for both, never the defaults for one.
    unset = template(helm, *GATEWAY, "--set", "remote.allowedHosts=null")
    assert gateway_remote_hosts(unset) == operator_remote_hosts(unset) == RemoteHosts((), ())


def test_service_monitors_scrape_the_metrics_ports_when_asked(helm: Path) -> None:
    assert not by_kind(template(helm, *GATEWAY), "ServiceMonitor")  # needs the CRDs: off
    docs = template(
        helm,
        *GATEWAY,
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=kps",
    )
    monitors = by_kind(docs, "ServiceMonitor")
    assert [m["metadata"]["name"] for m in monitors] == [
        "rel-fabric-operator",
        "rel-fabric-operator-gateway",
    ]
    services = by_kind(docs, "Service")
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kps"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ops"]}
        wanted = monitor["spec"]["selector"]["matchLabels"].items()
        # Each selects exactly its own Service, whose metrics port leads to the container's.
        [service] = [s for s in services if wanted <= s["metadata"]["labels"].items()]
        assert service["metadata"]["name"] == monitor["metadata"]["name"]
        [endpoint] = monitor["spec"]["endpoints"]
        assert endpoint == {
            "port": "metrics",
            "path": "/metrics",
            "interval": "30s",
            "scrapeTimeout": "10s",
        }
        [port] = [p for p in service["spec"]["ports"] if p["name"] == "metrics"]
        pod = deployments[service["metadata"]["name"]]["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert port["targetPort"] in ports
    without_gateway = template(helm, "--set", "metrics.serviceMonitor.enabled=true")
    assert len(by_kind(without_gateway, "ServiceMonitor")) == 1


def test_gateway_network_policy_keeps_the_metrics_port_to_the_operator(helm: Path) -> None:
    assert not by_kind(template(helm, *GATEWAY), "NetworkPolicy")  # opt-in
    monitoring = "{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}"
    docs = template(
        helm,
        *GATEWAY,
        *("--set", "gateway.networkPolicy.enabled=true"),
        *(
            "--set-json",
            f"gateway.networkPolicy.metricsFrom=[{json.dumps(yaml.safe_load(monitoring))}]",
        ),
    )
    [policy] = by_kind(docs, "NetworkPolicy")
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    [gateway_deployment] = [
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-gateway")
    ]
    selector = gateway_deployment["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    api, metrics = policy["spec"]["ingress"]
    assert api == {"ports": [{"port": "http", "protocol": "TCP"}]}  # every team's
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    [operator_deployment] = [
        d for d in by_kind(docs, "Deployment") if not d["metadata"]["name"].endswith("-gateway")
    ]
    operator_pods = operator_deployment["spec"]["template"]["metadata"]["labels"]
    first, second = metrics["from"]
    assert first["podSelector"]["matchLabels"].items() <= operator_pods.items()
    assert "namespaceSelector" not in first  # the operator's own namespace only
    assert second == yaml.safe_load(monitoring)


def test_an_upgrade_reusing_older_values_still_renders(helm: Path) -> None:
    """`helm upgrade --reuse-values` from a release made before a value existed: the
    value is missing, the template renders, the gateway's own default applies."""
    older = [
        *GATEWAY,
        *("--set", "gateway.timeouts=null", "--set", "gateway.networkPolicy=null"),
        *("--set", "gateway.maxHeldRequests=null", "--set", "gateway.maxBodyMiB=null"),
    ]
    docs = template(helm, *older)
    [gateway_deployment] = [
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-gateway")
    ]
    args = gateway_deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if "timeout" in a or "max-held-requests" in a or "body" in a]
    assert "--max-held-mib=256" in args  # what is still set is still passed
    assert not by_kind(docs, "NetworkPolicy")


def test_disruption_budgets_for_the_operator_and_gateway_when_they_run_several(
    helm: Path,
) -> None:
    # Defaults: one operator (no budget: it would block every drain), two gateways.
    docs = template(helm, "--set", "gateway.enabled=true", "--kube-version=1.33.0")
    [pdb] = by_kind(docs, "PodDisruptionBudget")
    [gateway] = [
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("gateway")
    ]
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]
    # Two operators (leader election), on Kubernetes 1.20: policy/v1beta1, both budgets.
    docs = template(
        helm,
        *("--set", "gateway.enabled=true", "--set", "replicaCount=2"),
        *("--set", "leaderElection.enabled=true", "--kube-version=1.20.15"),
    )
    budgets = by_kind(docs, "PodDisruptionBudget")
    assert len(budgets) == 2 and {b["apiVersion"] for b in budgets} == {"policy/v1beta1"}
    [operator] = [
        d for d in by_kind(docs, "Deployment") if not d["metadata"]["name"].endswith("gateway")
    ]
    selectors = [b["spec"]["selector"]["matchLabels"] for b in budgets]
    assert operator["spec"]["selector"]["matchLabels"] in selectors
    # Off: none; and the backends' own follow podDisruptionBudgets.backends.
    docs = template(
        helm,
        *("--set", "gateway.enabled=true", "--set", "podDisruptionBudgets.operator=false"),
        *("--set", "podDisruptionBudgets.backends=false"),
    )
    assert by_kind(docs, "PodDisruptionBudget") == []
    [config] = by_kind(docs, "ConfigMap")
    assert "podDisruptionBudgets: false" in config["data"]["config.yaml"]


def test_gateway_replicas_share_limits_through_redis_when_given(helm: Path) -> None:
    def gateway(*args: str) -> dict[str, Any]:
        docs = template(helm, "--set", "gateway.enabled=true", *args)
        [dep] = [
            d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("gateway")
        ]
        container: dict[str, Any] = dep["spec"]["template"]["spec"]["containers"][0]
        return container

    plain = gateway()
    assert not [a for a in plain["args"] if a.startswith("--redis")] and "env" not in plain
    shared = gateway(
        *("--set", "gateway.redis.url=rediss://redis.ops:6380/0"),
        *("--set", "gateway.redis.passwordSecretRef.name=redis-auth"),
        *("--set", "gateway.redis.passwordSecretRef.key=password"),
    )
    assert "--redis-url=rediss://redis.ops:6380/0" in shared["args"]
    assert "--redis-timeout=0.05" in shared["args"]
    # The password only by reference, never in the args or a value.
    assert shared["env"] == [
        {
            "name": "FABRIC_REDIS_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}},
        }
    ]
    assert "password" not in " ".join(shared["args"]).replace("--redis", "")
    assert "gateway.redis.url: Does not match" in refused(
        helm, "--set", "gateway.redis.url=http://x"
    )
