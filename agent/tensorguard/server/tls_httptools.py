"""uvicorn's httptools (C) HTTP/1.1 protocol plus the ASGI TLS extension; imported only when installed."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .tlsfront import Proxied
from .tlsproto import PeerCert


class PeerCertHttpToolsProtocol(PeerCert, HttpToolsProtocol):
    """Like `tlsproto.PeerCertH11Protocol`, on the C parser (~0.07 ms less per request than h11)."""


class ProxiedHttpToolsProtocol(Proxied, HttpToolsProtocol):
    """The httptools protocol behind the rustls front (`tlsfront.Proxied`)."""
