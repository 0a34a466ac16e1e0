"""HTTPS for the API: the TLS context, and the client certificate handed to the app.

uvicorn does not put the peer certificate into the ASGI scope. `PeerCertH11Protocol` is uvicorn's
h11 protocol (selected with ``Config(http=PeerCertH11Protocol)``) that adds the ASGI TLS extension
(asgiref specs/tls.rst: ``scope["extensions"]["tls"]``) with the verified client certificate of the
connection; `tls_httptools.PeerCertHttpToolsProtocol` does the same for uvicorn's httptools protocol.
Python's ssl module exposes only the leaf of the client's chain, so ``client_cert_chain`` holds one
PEM certificate at most.

Client certificates are verified in the handshake (signed by our intermediate, clientAuth purpose)
except for their dates: with TLS 1.3 a handshake refusal reaches the client only as "server
disconnected", with no reason and no audit entry. Dates are checked instead by `peer.PeerVerifier`,
with the app's clock, and an expired certificate gets a 403 naming its expiry. Every use of the client
certificate must go through `PeerVerifier.verify`.

The intermediate is the handshake's only trust anchor (OpenSSL's partial-chain flag): robots'
certificates are issued by it alone, so a chain through any other certificate of the root is refused
in the handshake, and the root's signature on the intermediate (checked once when the CA loads) is not
verified again on every connection. The server sends no TLS 1.3 session tickets: a resumed session
carries the certificate of the handshake that created it, which a robot has replaced at its renewal
since (the CA would renew on an older certificate's authority, and refuse once that one expires), and
the robot's EST client never resumes anyway: each ticket cost ~0.17 ms of server CPU per connection
(measured) for nothing.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from uvicorn.protocols.http.h11_impl import H11Protocol

from .asgi import ASGIApp
from .asgitls import TLSExtension, WithTLS
from .tlsfront import Proxied

X509_V_FLAG_NO_CHECK_TIME = 0x200000
"""OpenSSL's X509_VERIFY_PARAM flag (X509_VERIFY_PARAM_set_flags(3)); Python's ssl has no name for it."""


def server_context(cert_chain: Path, key: Path, client_issuer: Path) -> ssl.SSLContext:
    """TLS 1.2+; a client certificate is optional, and when sent must be signed by ``client_issuer``
    (the intermediate; its dates are checked by the app, see the module docstring)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_chain, key)
    context.load_verify_locations(cafile=client_issuer)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.verify_flags |= X509_V_FLAG_NO_CHECK_TIME | ssl.VERIFY_X509_PARTIAL_CHAIN
    context.num_tickets = 0
    return context


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket, server_cert_pem: str | None) -> TLSExtension:
    """The ASGI TLS extension (asgiref specs/tls.rst) for one established connection."""
    return TLSExtension(ssl_object.getpeercert(binary_form=True), server_cert_pem, ssl_object.version())


class PeerCert:
    """Mixin for a uvicorn HTTP protocol class (first among the bases): every HTTP scope of a TLS
    connection gets the ASGI TLS extension with the connection's verified client certificate."""

    server_cert_pem: str | None = None
    app: ASGIApp

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = WithTLS(self.app, tls_extension(ssl_object, self.server_cert_pem))


class PeerCertH11Protocol(PeerCert, H11Protocol):
    """uvicorn's h11 HTTP/1.1 protocol plus the ASGI TLS extension (client certificate)."""


class ProxiedH11Protocol(Proxied, H11Protocol):
    """uvicorn's h11 protocol behind the rustls front (`tlsfront.Proxied`)."""
