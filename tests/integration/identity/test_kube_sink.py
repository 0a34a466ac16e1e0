"""The kubernetes.io/tls Secret sink through the official client, against a stand-in API server."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tensorguard.identity.kube import KubeSinkError, SecretTarget, install_secret

from .kube_standin import StandInKubeApiServer

pytest.importorskip("kubernetes", reason="needs the kubernetes client (pip install kubernetes==22.6.0)")


def test_creates_then_replaces_the_tls_secret(tmp_path: Path) -> None:
    with StandInKubeApiServer() as api:
        target = SecretTarget("robots", "robot-7-tls", api.kubeconfig(tmp_path / "kubeconfig"))
        first = install_secret(target, b"CERT1", b"KEY1", b"CA", {"tensorguard.io/node": "robot-7"})
        secret = api.secrets[("robots", "robot-7-tls")]
        assert secret["type"] == "kubernetes.io/tls"
        assert base64.b64decode(secret["data"]["tls.crt"]) == b"CERT1"
        assert base64.b64decode(secret["data"]["tls.key"]) == b"KEY1"
        assert base64.b64decode(secret["data"]["ca.crt"]) == b"CA"
        assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tensorguard-identity"

        second = install_secret(target, b"CERT2", b"KEY2", b"CA")
        assert int(second) > int(first)
        secret = api.secrets[("robots", "robot-7-tls")]
        assert base64.b64decode(secret["data"]["tls.crt"]) == b"CERT2"
        assert base64.b64decode(secret["data"]["tls.key"]) == b"KEY2"
        methods = [m for m, _ in api.requests]
        assert methods == ["GET", "POST", "GET", "PUT"]


def test_refusals_name_the_secret_and_the_reason(tmp_path: Path) -> None:
    with StandInKubeApiServer() as api:
        bad_token = SecretTarget("robots", "x-tls", api.kubeconfig(tmp_path / "bad", token="wrong"))
        with pytest.raises(KubeSinkError, match="secret robots/x-tls: the API server answered 401"):
            install_secret(bad_token, b"C", b"K", b"CA")
        api.secrets[("robots", "opaque")] = {"type": "Opaque", "metadata": {
            "name": "opaque", "namespace": "robots", "resourceVersion": "5"}, "data": {}}
        target = SecretTarget("robots", "opaque", api.kubeconfig(tmp_path / "kubeconfig"))
        with pytest.raises(KubeSinkError, match=r"type Opaque, not kubernetes\.io/tls"):
            install_secret(target, b"C", b"K", b"CA")
        assert api.secrets[("robots", "opaque")]["data"] == {}
    gone = SecretTarget("robots", "x-tls", tmp_path / "kubeconfig")  # the server has stopped
    with pytest.raises(KubeSinkError, match="cannot reach the API server"):
        install_secret(gone, b"C", b"K", b"CA")
    with pytest.raises(KubeSinkError, match="cannot configure the Kubernetes client"):
        install_secret(SecretTarget("robots", "x", tmp_path / "missing"), b"C", b"K", b"CA")
