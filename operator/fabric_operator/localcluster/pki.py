"""Throw-away certificates for a local cluster: one CA, and leaf certificates signed by it
(the API server's serving certificate, the admin's, each node's kubelet and kube-proxy).

openssl does the work; a leaf's identity is its subject (`O=` are groups, `CN=` the user),
as the API server's x509 authenticator reads it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path) -> None:
    """ca.crt/ca.key in `d` (ten years: nothing here outlives a test run anyway)."""
    d.mkdir(parents=True, exist_ok=True)
    openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key"),
        *("-out", "ca.crt", "-days", "3650", "-subj", "/CN=fabric-local-ca"),
        cwd=d,
    )


def issue(d: Path, name: str, subject: str, sans: list[str] | None = None) -> tuple[Path, Path]:
    """`name`.crt/.key signed by the CA in `d`; `sans` like ["IP:127.0.0.1", "DNS:x"]."""
    openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key"),
        *("-out", f"{name}.csr", "-subj", subject),
        cwd=d,
    )
    ext: list[str] = []
    if sans:
        (d / f"{name}.ext").write_text(f"subjectAltName={','.join(sans)}\n")
        ext = ["-extfile", f"{name}.ext"]
    openssl(
        *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-out", f"{name}.crt", "-days", "3650", *ext),
        cwd=d,
    )
    return d / f"{name}.crt", d / f"{name}.key"


def service_account_keys(d: Path) -> None:
    """sa.key/sa.pub: the API server signs ServiceAccount tokens with them."""
    openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str = "admin") -> str:
    """A kubeconfig with one cluster, one x509 user and one context."""
    return f"""apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: local
  context: {{cluster: local, user: {user}}}
current-context: local
"""
