"""A real, local Kubernetes cluster for development and tests on machines without Docker:
the control plane on 127.0.0.1 and, where the machine allows, real nodes (containerd and a
kubelet, each in network, mount and PID namespaces of its own)."""

from fabric_operator.localcluster.controlplane import LocalControlPlane, find_binaries, free_port

__all__ = ["LocalControlPlane", "find_binaries", "free_port"]
