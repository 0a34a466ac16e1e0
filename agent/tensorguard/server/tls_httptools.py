"""uvicorn's httptools (C) HTTP/1.1 protocol plus the ASGI TLS extension; imported only when installed."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .tlsproto import WithTLS, tls_extension


class PeerCertHttpToolsProtocol(HttpToolsProtocol):
    """Like `tlsproto.PeerCertH11Protocol`, on the C parser (~0.07 ms less per request than h11)."""

    server_cert_pem: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = WithTLS(self.app, tls_extension(ssl_object, self.server_cert_pem))
