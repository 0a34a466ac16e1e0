"""Install the certificate as a Kubernetes ``kubernetes.io/tls`` Secret with the official client.

Key and certificate travel in one object, so a pod never sees a mismatched pair; replacing
carries the resourceVersion read just before, so a concurrent writer is detected rather than
overwritten blindly. The client library is imported only when a kubernetes sink is configured
(Debian: python3-kubernetes, a Recommends of tensorguard-agent).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECRET_TYPE = "kubernetes.io/tls"  # noqa: S105 (a type name, not a password)
MANAGED_BY = "tensorguard-identity"


class KubeSinkError(Exception):
    """The Secret could not be written; the message names the Secret and the API's answer."""


@dataclass(frozen=True)
class SecretTarget:
    namespace: str
    name: str
    kubeconfig: Path | None = None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def secret_body(target: SecretTarget, cert_chain_pem: bytes, key_pem: bytes, ca_pem: bytes, *,
                labels: dict[str, str], resource_version: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": target.name, "namespace": target.namespace,
                                "labels": {"app.kubernetes.io/managed-by": MANAGED_BY, **labels}}
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    return {"apiVersion": "v1", "kind": "Secret", "type": SECRET_TYPE, "metadata": metadata,
            "data": {"tls.crt": _b64(cert_chain_pem), "tls.key": _b64(key_pem),
                     "ca.crt": _b64(ca_pem)}}


def _api(target: SecretTarget) -> Any:
    try:
        from kubernetes import client, config  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise KubeSinkError("a kubernetes sink needs the kubernetes client library "
                            "(apt install python3-kubernetes)") from None
    try:
        if target.kubeconfig is not None:
            api_client = config.new_client_from_config(config_file=str(target.kubeconfig))
        else:
            config.load_incluster_config()
            api_client = client.ApiClient()
    except Exception as exc:  # the library raises several unrelated types for bad configs
        where = target.kubeconfig or "the in-cluster service account"
        raise KubeSinkError(f"cannot configure the Kubernetes client from {where}: {exc}") from None
    return client.CoreV1Api(api_client)


def install_secret(target: SecretTarget, cert_chain_pem: bytes, key_pem: bytes, ca_pem: bytes,
                   labels: dict[str, str] | None = None) -> str:
    """Create or replace the Secret; returns its new resourceVersion."""
    from kubernetes.client.exceptions import ApiException  # noqa: PLC0415 (optional dependency)

    api = _api(target)
    where = f"secret {target.namespace}/{target.name}"
    try:
        try:
            current = api.read_namespaced_secret(target.name, target.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            created = api.create_namespaced_secret(
                target.namespace, secret_body(target, cert_chain_pem, key_pem, ca_pem, labels=labels or {}))
            return str(created.metadata.resource_version)
        if current.type != SECRET_TYPE:
            raise KubeSinkError(f"{where} exists with type {current.type}, not {SECRET_TYPE}: "
                                "refusing to overwrite it")
        replaced = api.replace_namespaced_secret(
            target.name, target.namespace,
            secret_body(target, cert_chain_pem, key_pem, ca_pem, labels=labels or {},
                        resource_version=current.metadata.resource_version))
        return str(replaced.metadata.resource_version)
    except ApiException as exc:
        reason = exc.reason or ""
        if exc.status == 409:
            reason = "changed by someone else while it was being replaced (409 Conflict)"
        raise KubeSinkError(f"{where}: the API server answered {exc.status} {reason}".rstrip()) from None
    except KubeSinkError:
        raise
    except Exception as exc:  # connection errors surface as urllib3 exceptions
        raise KubeSinkError(f"{where}: cannot reach the API server: {exc}") from None
