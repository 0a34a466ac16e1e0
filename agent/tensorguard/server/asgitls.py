"""The ASGI TLS extension (asgiref specs/tls.rst) and the wrapper that puts it into every HTTP scope of a
connection, whoever terminated its TLS: the worker itself (tlsproto) or the rustls front (tlsfront)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Mapping
from typing import Any

from cryptography import x509

from .asgi import ASGIApp, Receive, Scope, Send

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class TLSExtension(Mapping[str, Any]):
    """The ASGI TLS extension of one connection, as a read-only mapping. ``client_cert_name`` is worked
    out on first use only: parsing the certificate for a name nobody reads was ~4 % of the server's CPU
    per mTLS renewal in a py-spy profile, and the EST endpoints read only ``client_cert_chain``."""

    _KEYS = ("server_cert", "client_cert_chain", "client_cert_name", "client_cert_error", "tls_version",
             "cipher_suite")

    def __init__(self, client_der: bytes | None, server_cert_pem: str | None, version: str | None) -> None:
        self._der = client_der
        self._values: dict[str, Any] = {
            "server_cert": server_cert_pem,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(client_der)] if client_der else [],
            "client_cert_error": None,  # the handshake refuses chains that do not verify
            "tls_version": _TLS_VERSIONS.get(version or ""),
            "cipher_suite": None,  # the ssl module gives the name only, not the IANA number
        }

    def __getitem__(self, key: str) -> Any:
        if key == "client_cert_name" and key not in self._values:
            self._values[key] = (x509.load_der_x509_certificate(self._der).subject.rfc4514_string()
                                 if self._der else None)
        if key not in self._KEYS:
            raise KeyError(key)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)


class WithTLS:
    """Adds one connection's TLS extension to every HTTP scope on that connection."""

    def __init__(self, app: ASGIApp, tls: Mapping[str, Any]) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = scope.setdefault("extensions", {})
        extensions["tls"] = self.tls
        await self.app(scope, receive, send)
